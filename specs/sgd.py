r"""SGD with optional momentum, dampening and L2 or decoupled weight decay (optimi's SGD).

$m_t = \mu m_{t-1} + g_t$, or with dampening $m_t = \mu m_{t-1} + (1-\mu) g_t$;
$p_t = p_{t-1} - \gamma m_t$ ($p_t = p_{t-1} - \gamma g_t$ without momentum). With ``momentum=0``
no momentum buffer is allocated. ``torch_init`` starts the dampened buffer from the first gradient,
as ``torch.optim.SGD`` does.
"""
from optcompile.spec import Interval, Ne, OptimizerSpec, Piecewise, oo

spec = OptimizerSpec("SGD", weight_decay="l2")
lr = spec.hyper("lr", domain=Interval(0, oo), doc="Learning rate")
momentum = spec.hyper("momentum", default=0, domain=Interval.Ropen(0, 1), doc="Momentum factor")
spec.weight_decay_hyper(0)
dampening = spec.flag("dampening", False, doc="Use dampening for momentum update")
torch_init = spec.flag("torch_init", False, after="max_lr",
                       doc="Initialize momentum buffer with first gradient instead of zeroes. Enable to match "
                           "PyTorch SGD when using dampening")
g = spec.grad
use_momentum = spec.let("use_momentum", Ne(momentum, 0))

m = spec.state("exp_avg", init=Piecewise((g, dampening & torch_init), (0, True)), when=use_momentum)
m = spec.assign(m, Piecewise((momentum * m + (1 - momentum) * g, dampening), (momentum * m + g, True)))
spec.update(Piecewise((m, use_momentum), (g, True)), lr=lr)

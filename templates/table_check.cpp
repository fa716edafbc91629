// optcompile: the fused step's prebuilt table, checked and read in one call
// (optcompile/backends/fused_runtime.py, TableChecker). Built once per machine and torch by the
// C++ compiler against torch's c10 headers (libc10); loaded with ctypes.PyDLL, so it runs holding
// the GIL.
//
// A table is given its params and states as Python objects, which the caller holds, and the
// offset in such an object of its TensorImpl pointer (THPVariable's `cdata`; measured and checked
// by the caller). Each step reads every object's TensorImpl afresh (torch.utils.swap_tensors
// gives an object another one; `p.data = x` and `set_()` change the one it has), checks it
// against the layout recorded when the table was built (dispatch keys, dtype, device, sizes,
// strides: what torch's TensorGuards compare), reads the grads from the params' autograd
// metadata and checks them likewise, and writes every data pointer into the kernel's table. Over thousands of small tensors that is reading
// metadata that a step's kernel has pushed out of the caches: one loop that prefetches a few
// tensors ahead overlaps those misses, which the Python reads and guards cannot.
#include <stdint.h>

#include <new>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>

namespace {

struct Layout {
    uint64_t keys;
    int64_t dtype, device, dim, at;  // at: the sizes, then the strides, in Table::dims
};

struct Table {
    int64_t n_params, impl_at;
    std::vector<const char *> kept, params;     // the Python objects
    std::vector<int64_t> slot;                  // each kept tensor's row in the pointer table
    std::vector<Layout> kept_layout, grad_layout;
    std::vector<int64_t> dims;
    std::vector<c10::TensorImpl *> grads;       // this step's, while the kernel runs
    std::vector<at::Tensor> held;               // references to them, dropped by oc_table_release
};

inline const c10::TensorImpl *impl_of(const Table &tab, const char *obj) {
    return *(c10::TensorImpl *const *)(obj + tab.impl_at);
}

int64_t device_code(const c10::TensorImpl *t) {
    const c10::Device d = t->device();
    return (int64_t)d.type() * 65536 + d.index();
}

void record(Table &tab, std::vector<Layout> &out, const c10::TensorImpl *t) {
    Layout l{t->key_set().raw_repr(), (int64_t)t->dtype().toScalarType(), device_code(t), t->dim(),
             (int64_t)tab.dims.size()};
    for (int64_t s : t->sizes()) tab.dims.push_back(s);
    for (int64_t s : t->strides()) tab.dims.push_back(s);
    out.push_back(l);
}

bool same(const Table &tab, const Layout &l, const c10::TensorImpl *t) {
    if (t->key_set().raw_repr() != l.keys || (int64_t)t->dtype().toScalarType() != l.dtype ||
        device_code(t) != l.device || t->dim() != l.dim || !t->has_storage())
        return false;
    const int64_t *d = tab.dims.data() + l.at;
    c10::IntArrayRef sizes = t->sizes(), strides = t->strides();
    for (int64_t k = 0; k < l.dim; k++)
        if (sizes[k] != d[k] || strides[k] != d[l.dim + k]) return false;
    return true;
}

const c10::TensorImpl *grad_of(const c10::TensorImpl *p) {
    const c10::AutogradMetaInterface *meta = p->autograd_meta();
    if (!meta) return nullptr;
    const at::Tensor &g = meta->grad();
    return g.defined() ? g.unsafeGetTensorImpl() : nullptr;
}

inline void prefetch_impl(const void *t) {
    const char *c = (const char *)t;
    __builtin_prefetch(c);
    __builtin_prefetch(c + 64);
    __builtin_prefetch(c + 128);
}

constexpr int64_t AHEAD = 8;  // tensors prefetched ahead of the one checked

}  // namespace

// A table over n_params params and their grads now and n_kept tensors (params and states),
// all given as the addresses of their Python objects, which the caller holds; a TensorImpl
// pointer at impl_at in each. kept[k] is written to slot[k] of the pointer table, grads to rows
// [n_params, 2 * n_params). NULL if a grad is missing or torch throws.
extern "C" void *oc_table_new(int64_t impl_at, int64_t n_params, const int64_t *params, int64_t n_kept,
                              const int64_t *kept, const int64_t *slot) {
    try {
        Table *tab = new Table();
        tab->n_params = n_params;
        tab->impl_at = impl_at;
        for (int64_t i = 0; i < n_params; i++) tab->params.push_back((const char *)(intptr_t)params[i]);
        for (int64_t k = 0; k < n_kept; k++) tab->kept.push_back((const char *)(intptr_t)kept[k]);
        tab->slot.assign(slot, slot + n_kept);
        for (const char *t : tab->kept) record(*tab, tab->kept_layout, impl_of(*tab, t));
        for (const char *p : tab->params) {
            const c10::TensorImpl *g = grad_of(impl_of(*tab, p));
            if (!g) {
                delete tab;
                return nullptr;
            }
            record(*tab, tab->grad_layout, g);
        }
        return tab;
    } catch (...) {
        return nullptr;
    }
}

extern "C" void oc_table_free(void *table) { delete (Table *)table; }

// Checks every tensor of the table and the params' grads now against the records and writes
// their data pointers into ptrs; the grads are held until oc_table_release. Returns 0; 1 if a
// kept tensor's layout changed, 2 if a grad is missing or changed, 3 if torch threw (ptrs is
// then partly written and must not be used).
extern "C" int oc_table_check(void *table, int64_t *ptrs) {
    Table &tab = *(Table *)table;
    try {
        const int64_t n_kept = (int64_t)tab.kept.size(), n = tab.n_params;
        for (int64_t k = 0; k < n_kept; k++) {
            if (k + 2 * AHEAD < n_kept) __builtin_prefetch(tab.kept[k + 2 * AHEAD] + tab.impl_at);
            if (k + AHEAD < n_kept) prefetch_impl(impl_of(tab, tab.kept[k + AHEAD]));
            const c10::TensorImpl *t = impl_of(tab, tab.kept[k]);
            if (!same(tab, tab.kept_layout[k], t)) return 1;
            ptrs[tab.slot[k]] = (int64_t)(intptr_t)t->data();
        }
        tab.grads.resize(n);
        for (int64_t i = 0; i < n; i++) {  // the params' metadata is warm: the grads' impls first
            const c10::TensorImpl *g = grad_of(impl_of(tab, tab.params[i]));
            if (!g) return 2;
            tab.grads[i] = const_cast<c10::TensorImpl *>(g);
            __builtin_prefetch(g);
        }
        for (int64_t i = 0; i < n; i++) {
            if (i + AHEAD < n) prefetch_impl(tab.grads[i + AHEAD]);
            const c10::TensorImpl *g = tab.grads[i];
            if (!same(tab, tab.grad_layout[i], g)) return 2;
            ptrs[n + i] = (int64_t)(intptr_t)g->data();
        }
        tab.held.clear();
        tab.held.reserve(n);
        for (c10::TensorImpl *g : tab.grads)
            tab.held.emplace_back(c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(g));
    } catch (...) {
        return 3;
    }
    return 0;
}

// Drops the references oc_table_check took to the grads (after the kernel call).
extern "C" void oc_table_release(void *table) { ((Table *)table)->held.clear(); }

// optcompile: the data pointers of many tensors in one call, for the fused step's prebuilt tables
// (optcompile/backends/fused_runtime.py, PointerReader). Built once per machine by the C++
// compiler: cc -O2 -shared -fPIC; loaded with ctypes.PyDLL, so it runs holding the GIL.
//
// The pointers come from torch's own accessor, the function that Inductor's generated C++ calls
// for each tensor argument (torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr: the
// address of `void *f(PyObject *)`, which throws where an object is not a tensor or has no data).
// Its exceptions are caught here and returned as a code: C++ is needed for that alone.
#include <stdint.h>

typedef void *(*oc_data_ptr_fn)(void *);

// out[i] = the data pointer of the tensor whose PyObject is objs[i]; 0 where objs[i] is 0.
// Returns 0; 1 if torch refused an object (out is then partly written and must not be used).
extern "C" int oc_data_ptrs(oc_data_ptr_fn get, const int64_t *objs, int64_t n, int64_t *out) {
    try {
        for (int64_t i = 0; i < n; i++)
            out[i] = objs[i] ? (int64_t)(intptr_t)get((void *)(intptr_t)objs[i]) : 0;
    } catch (...) {
        return 1;
    }
    return 0;
}

"""A DLPack producer whose memory claims to live on CUDA device 0, so the device check of the
Python layer is tested on machines without a GPU. Its data pointer is never dereferenced: the
layer refuses the array before reading it."""

import ctypes


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

K_DL_CUDA = 2


class FakeCudaArray:
    """float32 C-contiguous array of `shape` on (claimed) CUDA device 0."""

    def __init__(self, shape):
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._backing = ctypes.create_string_buffer(64)  # a valid address, never read
        self._managed = _DLManagedTensor()
        t = self._managed.dl_tensor
        t.data = ctypes.cast(self._backing, ctypes.c_void_p).value
        t.device = _DLDevice(K_DL_CUDA, 0)
        t.ndim = len(shape)
        t.dtype = _DLDataType(2, 32, 1)
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0

    def __dlpack_device__(self):
        return (K_DL_CUDA, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        return _capsule_new(ctypes.addressof(self._managed), b"dltensor", None)

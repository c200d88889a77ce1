/* worker._wirestuff: the C twin of worker.wire.DotStuffer (RFC 1939 section 3 line ends and
 * dot-stuffing), built at install as an optional extension (pyproject.toml). worker/wire.py keeps the
 * pure-Python class as the reference and picks this one when it imports; tests/test_wire.py
 * checks both give the same bytes for any input and chunking.
 *
 * One pass per chunk: memchr finds each LF, the bytes before it are copied with memcpy (a bare
 * CR inside a line needs no change), the line end is written as CRLF, and a "." right after a
 * line end (or at the start, while at_line_start holds) is doubled. A CR that ends a chunk is
 * held until the next one tells whether an LF follows it. The output is allocated once at its
 * worst-case size (every byte an LF followed by "." gives 2 out per 1 in, plus a held CR and a
 * leading dot) and shrunk to fit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    char at_line_start;
    char carry_cr;
} StufferObject;

static int
stuffer_init(StufferObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":DotStuffer", kwlist))
        return -1;
    self->at_line_start = 1;
    self->carry_cr = 0;
    return 0;
}

/* Stuff in[0:n] into out (room for 2 * n + 2 bytes); returns the bytes written. */
static Py_ssize_t
stuff(StufferObject *self, const char *in, Py_ssize_t n, char *out)
{
    char *w = out;
    Py_ssize_t pos = 0;
    char line_start = self->at_line_start;

    if (self->carry_cr) {
        self->carry_cr = 0;
        if (in[0] == '\n') {
            *w++ = '\r';
            *w++ = '\n';
            pos = 1;
            line_start = 1;
        } else {
            *w++ = '\r';
            line_start = 0;
        }
    }
    while (pos < n) {
        const char *start = in + pos;
        const char *nl;
        Py_ssize_t len;

        if (line_start && *start == '.')
            *w++ = '.';
        nl = memchr(start, '\n', (size_t)(n - pos));
        if (nl == NULL) {
            len = n - pos;
            if (in[n - 1] == '\r') {   /* its LF may start the next chunk */
                self->carry_cr = 1;
                len--;
            }
            if (len > 0) {
                memcpy(w, start, (size_t)len);
                w += len;
                line_start = 0;
            }
            break;
        }
        len = nl - start;
        if (len > 0 && nl[-1] == '\r')
            len--;                     /* CRLF stays one CRLF */
        memcpy(w, start, (size_t)len);
        w += len;
        *w++ = '\r';
        *w++ = '\n';
        line_start = 1;
        pos = (nl - in) + 1;
    }
    self->at_line_start = line_start;
    return w - out;
}

static PyObject *
stuffer_feed(StufferObject *self, PyObject *arg)
{
    Py_buffer view;
    PyObject *result;
    Py_ssize_t size;

    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len == 0) {
        PyBuffer_Release(&view);
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    if (view.len > (PY_SSIZE_T_MAX - 2) / 2) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    result = PyBytes_FromStringAndSize(NULL, view.len * 2 + 2);
    if (result == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    size = stuff(self, (const char *)view.buf, view.len, PyBytes_AS_STRING(result));
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&result, size) < 0)
        return NULL;                   /* _PyBytes_Resize released it */
    return result;
}

static PyObject *
stuffer_finish(StufferObject *self, PyObject *Py_UNUSED(ignored))
{
    char tail[8];
    Py_ssize_t n = 0;

    if (self->carry_cr) {
        tail[n++] = '\r';
        self->carry_cr = 0;
        self->at_line_start = 0;
    }
    if (!self->at_line_start) {
        tail[n++] = '\r';
        tail[n++] = '\n';
    }
    self->at_line_start = 1;
    tail[n++] = '.';
    tail[n++] = '\r';
    tail[n++] = '\n';
    return PyBytes_FromStringAndSize(tail, n);
}

static PyMethodDef stuffer_methods[] = {
    {"feed", (PyCFunction)stuffer_feed, METH_O,
     "feed(chunk) -> bytes: the wire form of a raw message chunk."},
    {"finish", (PyCFunction)stuffer_finish, METH_NOARGS,
     "finish() -> bytes: a held CR, a CRLF if the last line had none, and \".\\r\\n\"."},
    {NULL, NULL, 0, NULL}
};

static PyMemberDef stuffer_members[] = {
    {"at_line_start", T_BOOL, offsetof(StufferObject, at_line_start), READONLY,
     "the next byte starts a line"},
    {"carry_cr", T_BOOL, offsetof(StufferObject, carry_cr), READONLY,
     "a CR that ended the last chunk waits for the next"},
    {NULL, 0, 0, 0, NULL}
};

static PyTypeObject StufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "worker._wirestuff.DotStuffer",
    .tp_doc = "Feed raw message chunks, get wire chunks; finish() ends the reply.",
    .tp_basicsize = sizeof(StufferObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)stuffer_init,
    .tp_methods = stuffer_methods,
    .tp_members = stuffer_members,
};

static struct PyModuleDef wirestuff_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "worker._wirestuff",
    .m_doc = "C twin of worker.wire.DotStuffer (optional; worker/wire.py falls back to Python).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__wirestuff(void)
{
    PyObject *module;

    if (PyType_Ready(&StufferType) < 0)
        return NULL;
    module = PyModule_Create(&wirestuff_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&StufferType);
    if (PyModule_AddObject(module, "DotStuffer", (PyObject *)&StufferType) < 0) {
        Py_DECREF(&StufferType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

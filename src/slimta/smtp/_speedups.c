/*
 * One pass over DATA content for slimta.smtp.data, with memchr doing the
 * per-line work: find the first <CRLF>.<CRLF>, notice bare CR or LF, notice
 * lines that start with a dot. The pure-Python fallback in data.py computes
 * the same answers with bytes.find/count; this is only faster.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/*
 * scan(buf, start, pending_cr) -> (eod, bare, dots, pending_cr)
 *
 * buf[start:] is content that follows a line end (or a CR, if pending_cr).
 * eod: index of the "." of the first "\r\n.\r\n" whose CR is at or after
 *      start (or whose LF is at start when pending_cr), else -1; the
 *      other results cover only the bytes before that CRLF.
 * bare: a CR not followed by LF, or an LF not preceded by CR, was seen.
 * dots: a line starting with "." was seen (dot-stuffing to undo).
 * pending_cr: the scanned bytes end in a CR whose LF may come next.
 */
static PyObject *
scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start;
    int pending_cr;
    if (!PyArg_ParseTuple(args, "y*np", &view, &start, &pending_cr))
        return NULL;
    const char *base = (const char *)view.buf;
    const char *end = base + view.len;
    const char *p = base + (start < 0 ? 0 : (start > view.len ? view.len : start));
    Py_ssize_t eod = -1;
    int bare = 0, dots = 0, pending_out = 0;

    Py_BEGIN_ALLOW_THREADS
    if (pending_cr) {
        if (p < end && *p == '\n') {
            const char *q = p + 1;
            if (q < end && *q == '.') {
                if (end - q >= 3 && q[1] == '\r' && q[2] == '\n') {
                    eod = q - base;
                    goto done;
                }
                dots = 1;
            }
            p = q;
        } else if (p < end) {
            bare = 1;
        } else {
            pending_out = 1;
        }
    }
    while (p < end) {
        const char *lf = memchr(p, '\n', end - p);
        const char *seg_end = lf ? lf : end;
        const char *cr = memchr(p, '\r', seg_end - p);
        if (lf == NULL) {
            if (cr != NULL && cr != end - 1)
                bare = 1;
            if (end[-1] == '\r')
                pending_out = 1;
            break;
        }
        if (cr != lf - 1)
            bare = 1;
        const char *q = lf + 1;
        if (q < end && *q == '.') {
            if (lf > p && lf[-1] == '\r' && end - q >= 3 && q[1] == '\r' && q[2] == '\n') {
                eod = q - base;
                break;
            }
            dots = 1;
        }
        p = q;
    }
done:
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("(nOOO)", eod, bare ? Py_True : Py_False,
                         dots ? Py_True : Py_False, pending_out ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(buf, start, pending_cr) -> (eod, bare, dots, pending_cr)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "slimta.smtp._speedups",
    "C speed-up for scanning SMTP DATA content (see slimta.smtp.data).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}

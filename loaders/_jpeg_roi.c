/* Region-of-interest JPEG decoding with libjpeg-turbo: only the rows and columns a crop needs, at 1/k scale.
 *
 * decode_region(data, scale_denom, left, top, right, bottom) -> (pixels, width, height, x_offset)
 *   The box is in the coordinates of the image scaled by 1/scale_denom (what libjpeg's DCT scaling produces).
 *   Rows above the box are skipped (jpeg_skip_scanlines: entropy-decoded, never inverse-transformed), rows below it
 *   are never read, and columns are cut to the box (jpeg_crop_scanline), which widens it to iMCU boundaries:
 *   `pixels` is a bytearray of `height` rows of `width` RGB pixels, whose first column is x_offset pixels left of
 *   the box.
 * A file libjpeg cannot decode raises Error with libjpeg's message. libjpeg's default error handler would end the
 * process, so errors jump back here instead; warnings (corrupt data libjpeg can decode around) are not printed,
 * as PIL and OpenCV do not print them. The GIL is released while libjpeg works.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <jpeglib.h>

static PyObject *JpegError;

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

struct job {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JDIMENSION left, top, right, bottom; /* the box, clamped to the scaled image */
    JDIMENSION x_offset, width;          /* the columns jpeg_crop_scanline decodes */
};

static void error_exit(j_common_ptr cinfo)
{
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void ignore_message(j_common_ptr cinfo)
{
    (void)cinfo;
}

static JDIMENSION clamp(long value, JDIMENSION high)
{
    return value < 0 ? 0 : value > (long)high ? high : (JDIMENSION)value;
}

/* Header, scale, start, column crop and the skip to the box's first row; runs without the GIL. On an error the
 * decompressor is destroyed and -1 returned, with libjpeg's message in err.message. */
static int start_region(struct job *job, const unsigned char *data, size_t size, int denom, long left, long top,
                        long right, long bottom)
{
    struct jpeg_decompress_struct *cinfo = &job->cinfo;
    if (setjmp(job->err.jump)) {
        jpeg_destroy_decompress(cinfo);
        return -1;
    }
    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    cinfo->out_color_space = JCS_EXT_RGB; /* libjpeg converts YCbCr and grayscale itself; CMYK is an error */
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned int)denom;
    jpeg_calc_output_dimensions(cinfo);
    job->left = clamp(left, cinfo->output_width - 1);
    job->top = clamp(top, cinfo->output_height - 1);
    job->right = clamp(right, cinfo->output_width);
    job->bottom = clamp(bottom, cinfo->output_height);
    if (job->right <= job->left)
        job->right = job->left + 1;
    if (job->bottom <= job->top)
        job->bottom = job->top + 1;
    jpeg_start_decompress(cinfo);
    /* One column of margin on each side: libjpeg upsamples chroma at the edges of a cropped row as at the edges of
     * the image, which would change the box's first and last columns. */
    job->x_offset = job->left > 0 ? job->left - 1 : 0;
    job->width = (job->right < cinfo->output_width ? job->right + 1 : job->right) - job->x_offset;
    jpeg_crop_scanline(cinfo, &job->x_offset, &job->width);
    jpeg_skip_scanlines(cinfo, job->top);
    return 0;
}

/* The box's rows into `out` (rows of job->width RGB pixels), then the decompressor is destroyed: the rows below
 * are never decoded. Runs without the GIL; -1 on an error, as start_region. */
static int read_region(struct job *job, unsigned char *out)
{
    struct jpeg_decompress_struct *cinfo = &job->cinfo;
    JSAMPROW row;
    if (setjmp(job->err.jump)) {
        jpeg_destroy_decompress(cinfo);
        return -1;
    }
    while (cinfo->output_scanline < job->bottom) {
        row = out + (size_t)(cinfo->output_scanline - job->top) * job->width * 3;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    jpeg_destroy_decompress(cinfo);
    return 0;
}

/* The same decode for callers without Python (the FFCV pipeline's compiled code, through ctypes): the box into
 * `out` (`capacity` bytes), as rows of geometry[0] RGB pixels starting geometry[1] pixels left of the box. Returns
 * the number of rows; -1 when libjpeg fails, -2 when the region does not fit `out`. Thread-safe: all state is on
 * the stack. */
long fastimagenet_decode_region(const unsigned char *data, unsigned long size, int denom, long left, long top,
                                long right, long bottom, unsigned char *out, unsigned long capacity,
                                unsigned int *geometry)
{
    struct job job;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8)
        return -1;
    job.cinfo.err = jpeg_std_error(&job.err.pub);
    job.err.pub.error_exit = error_exit;
    job.err.pub.output_message = ignore_message;
    if (start_region(&job, data, (size_t)size, denom, left, top, right, bottom) < 0)
        return -1;
    if ((unsigned long)(job.bottom - job.top) * job.width * 3 > capacity) {
        jpeg_destroy_decompress(&job.cinfo);
        return -2;
    }
    if (read_region(&job, out) < 0)
        return -1;
    geometry[0] = job.width;
    geometry[1] = job.left - job.x_offset;
    return (long)(job.bottom - job.top);
}

static PyObject *decode_region(PyObject *self, PyObject *args)
{
    Py_buffer data;
    int denom, status;
    long left, top, right, bottom;
    struct job job;
    PyObject *pixels;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*illll", &data, &denom, &left, &top, &right, &bottom))
        return NULL;
    if (denom != 1 && denom != 2 && denom != 4 && denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "scale_denom must be 1, 2, 4 or 8, not %d", denom);
    }
    job.cinfo.err = jpeg_std_error(&job.err.pub);
    job.err.pub.error_exit = error_exit;
    job.err.pub.output_message = ignore_message;

    Py_BEGIN_ALLOW_THREADS
    status = start_region(&job, data.buf, (size_t)data.len, denom, left, top, right, bottom);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(JpegError, job.err.message);
        return NULL;
    }
    pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(job.bottom - job.top) * job.width * 3);
    if (pixels == NULL) {
        jpeg_destroy_decompress(&job.cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    status = read_region(&job, (unsigned char *)PyByteArray_AS_STRING(pixels));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status < 0) {
        Py_DECREF(pixels);
        PyErr_SetString(JpegError, job.err.message);
        return NULL;
    }
    return Py_BuildValue("(NIII)", pixels, job.width, job.bottom - job.top, job.left - job.x_offset);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, scale_denom, left, top, right, bottom) -> (pixels, width, height, x_offset): the box of "
     "the JPEG `data` scaled by 1/scale_denom, as rows of `width` RGB pixels starting x_offset pixels left of it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_roi", "Region-of-interest JPEG decoding.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__jpeg_roi(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    JpegError = PyErr_NewException("_jpeg_roi.Error", PyExc_ValueError, NULL);
    if (PyModule_AddObjectRef(m, "Error", JpegError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

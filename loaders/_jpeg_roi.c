/* Region-of-interest JPEG decoding with libjpeg-turbo: only the rows and columns a crop needs, at 1/k scale.
 *
 * decode_region(data, scale_denom, left, top, right, bottom) -> (pixels, width, height, x_offset)
 *   The box is in the coordinates of the image scaled by 1/scale_denom (what libjpeg's DCT scaling produces).
 *   Rows above the box are skipped (jpeg_skip_scanlines: entropy-decoded, never inverse-transformed), rows below it
 *   are never read, and columns are cut to the box (jpeg_crop_scanline), which widens it to iMCU boundaries:
 *   `pixels` is a bytearray of `height` rows of `width` RGB pixels, whose first column is x_offset pixels left of
 *   the box.
 * area_resize(pixels, row_width, x_offset, width, height, out, flip)
 *   A width x height crop of such rows (starting x_offset pixels in) shrunk into the square RGB array `out` by area
 *   averaging (each output pixel the mean of the input area it covers, as OpenCV's INTER_AREA), mirrored when flip.
 * A file libjpeg cannot decode raises Error with libjpeg's message. libjpeg's default error handler would end the
 * process, so errors jump back here instead; warnings (corrupt data libjpeg can decode around) are not printed,
 * as PIL and OpenCV do not print them. The GIL is released while libjpeg works.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
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


/* Area-averaging weights of one axis, n input pixels onto m output pixels (n >= m): output j covers [j*n/m,
 * (j+1)*n/m), and input pixel i weighs the length of its overlap with that interval, in units of 1/16384 of the
 * interval (exactly 16384 per output: the rounding is given to its largest tap). `first[j]` is j's first input
 * pixel, `weights[j * taps + k]` its k-th tap's weight (0 past its last). */
#define WEIGHT_BITS 14
static void area_weights(int n, int m, int taps, int *first, int *weights)
{
    double scale = (double)n / m;
    for (int j = 0; j < m; j++) {
        double start = j * scale, end = (j + 1) * scale;
        int i0 = (int)floor(start), total = 0, largest = 0;
        first[j] = i0;
        for (int k = 0; k < taps; k++) {
            int i = i0 + k;
            double overlap = i < n ? fmin(i + 1, end) - fmax(i, start) : 0.0; /* 0 past the edge */
            int w = overlap > 0 ? (int)lround(overlap / scale * (1 << WEIGHT_BITS)) : 0;
            weights[j * taps + k] = w;
            total += w;
            if (w > weights[j * taps + largest])
                largest = k;
        }
        weights[j * taps + largest] += (1 << WEIGHT_BITS) - total;
    }
}

/* Rows first (a weighted sum of whole rows: loops the compiler vectorises) into 8.8 fixed point, then columns. */
static int shrink_area(const unsigned char *src, size_t stride, int width, int height, unsigned char *out, int size,
                       int flip)
{
    int taps_y = (int)ceil((double)height / size) + 1, taps_x = (int)ceil((double)width / size) + 1;
    size_t row = (size_t)width * 3;
    int *first_y = malloc(sizeof(int) * size), *first_x = malloc(sizeof(int) * size);
    int *weights_y = malloc(sizeof(int) * size * taps_y), *weights_x = malloc(sizeof(int) * size * taps_x);
    int *sums = malloc(sizeof(int) * row);
    /* each row padded with taps_x zero pixels, so every output sums taps_x of them without a bounds check */
    size_t padded = row + 3 * (size_t)taps_x;
    unsigned short *rows = calloc(padded * size, sizeof(unsigned short));
    if (!first_y || !first_x || !weights_y || !weights_x || !sums || !rows) {
        free(first_y); free(first_x); free(weights_y); free(weights_x); free(sums); free(rows);
        return -1;
    }
    area_weights(height, size, taps_y, first_y, weights_y);
    area_weights(width, size, taps_x, first_x, weights_x);
    for (int y = 0; y < size; y++) {
        for (size_t x = 0; x < row; x++)
            sums[x] = 0;
        for (int k = 0; k < taps_y && first_y[y] + k < height; k++) {
            const unsigned char *restrict line = src + (size_t)(first_y[y] + k) * stride;
            int *restrict acc = sums;
            short w = (short)weights_y[y * taps_y + k]; /* 16-bit factors: a widening multiply SSE2 has */
            for (size_t x = 0; x < row; x++)
                acc[x] += w * (short)line[x];
        }
        for (size_t x = 0; x < row; x++)
            rows[y * padded + x] = (unsigned short)((sums[x] + (1 << (WEIGHT_BITS - 9))) >> (WEIGHT_BITS - 8));
    }
    for (int y = 0; y < size; y++) {
        const unsigned short *line = rows + y * padded;
        unsigned char *dst = out + (size_t)y * size * 3;
        for (int j = 0; j < size; j++) {
            const int *w = weights_x + j * taps_x;
            const unsigned short *p = line + (size_t)first_x[j] * 3;
            int r = 0, g = 0, b = 0;
            for (int k = 0; k < taps_x; k++) {
                r += w[k] * p[3 * k];
                g += w[k] * p[3 * k + 1];
                b += w[k] * p[3 * k + 2];
            }
            unsigned char *o = dst + 3 * (flip ? size - 1 - j : j);
            int half = 1 << (WEIGHT_BITS + 7);
            o[0] = (unsigned char)((r + half) >> (WEIGHT_BITS + 8));
            o[1] = (unsigned char)((g + half) >> (WEIGHT_BITS + 8));
            o[2] = (unsigned char)((b + half) >> (WEIGHT_BITS + 8));
        }
    }
    free(first_y); free(first_x); free(weights_y); free(weights_x); free(sums); free(rows);
    return 0;
}

static PyObject *area_resize(PyObject *self, PyObject *args)
{
    Py_buffer pixels, out;
    Py_ssize_t row_width, x_offset, width, height;
    int flip, size, status;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nnnnw*p", &pixels, &row_width, &x_offset, &width, &height, &out, &flip))
        return NULL;
    size = (int)sqrt((double)(out.len / 3));
    if (width < 1 || height < 1 || x_offset < 0 || x_offset + width > row_width ||
        row_width * height * 3 > pixels.len || (Py_ssize_t)size * size * 3 != out.len || !PyBuffer_IsContiguous(&out, 'C') ||
        width < size || height < size) {
        PyBuffer_Release(&pixels);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "area_resize: a %zdx%zd crop at %zd of %zd-pixel rows (%zd bytes) does "
                            "not shrink into a contiguous square of %zd bytes", width, height, x_offset, row_width,
                            pixels.len, out.len);
    }
    Py_BEGIN_ALLOW_THREADS
    status = shrink_area((const unsigned char *)pixels.buf + x_offset * 3, (size_t)row_width * 3, (int)width,
                         (int)height, out.buf, size, flip);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&pixels);
    PyBuffer_Release(&out);
    if (status < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, scale_denom, left, top, right, bottom) -> (pixels, width, height, x_offset): the box of "
     "the JPEG `data` scaled by 1/scale_denom, as rows of `width` RGB pixels starting x_offset pixels left of it."},
    {"area_resize", area_resize, METH_VARARGS,
     "area_resize(pixels, row_width, x_offset, width, height, out, flip): the width x height crop of rows of row_width "
     "RGB pixels, x_offset pixels in, averaged by area into the square RGB array `out` (at most its size on each "
     "side), mirrored when flip."},
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

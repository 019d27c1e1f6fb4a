/* CPU kernel of lyra_ops.warp.forward_warp (built and loaded by lyra_ops/warp_kernel.py; no Python headers).
 *
 * Same formulas as forward_warp_reference, in float64 throughout (points, splat coordinates, weights and the
 * accumulated sums), so the result is the reference's up to the order of the float64 additions; the unprojection
 * and projection repeat the reference's operations in the same order (built with -ffp-contract=off: no FMA), so
 * the splat coordinates, hence floor cells and zero / non-zero weights (the mask), are bit-identical to it.
 *
 * Threads: pass 1 (projection, per point) is split over point ranges; pass 2 (accumulation) over bands of rows
 * of the canvas: every thread scans the points in order and adds only the corners that fall in its band, so
 * each pixel receives its contributions in point order whatever the thread count (bit-identical results).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SNAP_TOLERANCE 1e-8
#define ETA_CAP 80.0
#define WEIGHT_SHIFT 40.0
#define MAX_THREADS 64

/* ------------------------------------------------------------------------------------------ source points */

/* dims: c, h, w, n, dbl (values / image are float64 when 1, float32 otherwise)
 * ptrs: depth (h*w) f64, valid (h*w) u8, kinv (3x3) f64, c2w (4x4) f64, image (c,h,w), points out (3,n) f64,
 *       values out (c,n) */
int lyra_warp_points(const int64_t *dims, void **ptrs) {
    const int64_t c = dims[0], h = dims[1], w = dims[2], n = dims[3], dbl = dims[4];
    const double *depth = ptrs[0], *k = ptrs[2], *m = ptrs[3];
    const uint8_t *valid = ptrs[1];
    double *pts = ptrs[5];
    int64_t p = 0;
    for (int64_t i = 0; i < h; i++) {
        const double v = (double)i + 0.5;
        for (int64_t j = 0; j < w; j++) {
            const int64_t q = i * w + j;
            if (!valid[q]) continue;
            if (p >= n) return -2;
            const double u = (double)j + 0.5, d = depth[q];
            double cam[3];
            for (int r = 0; r < 3; r++) cam[r] = ((k[3 * r] * u + k[3 * r + 1] * v) + k[3 * r + 2]) * d;
            for (int r = 0; r < 3; r++)
                pts[r * n + p] = ((m[4 * r] * cam[0] + m[4 * r + 1] * cam[1]) + m[4 * r + 2] * cam[2]) + m[4 * r + 3];
            for (int64_t ch = 0; ch < c; ch++) {
                if (dbl) ((double *)ptrs[6])[ch * n + p] = ((const double *)ptrs[4])[ch * h * w + q];
                else ((float *)ptrs[6])[ch * n + p] = ((const float *)ptrs[4])[ch * h * w + q];
            }
            p++;
        }
    }
    return p == n ? 0 : -2;
}

/* ------------------------------------------------------------------------------------------ splatting */

typedef struct {
    int64_t c, h, w, n;
    const double *pts; /* (3,n) */
    const float *vals; /* (c,n) */
    const double *P;   /* (3,4) of the current frame */
    double scale, hole, lmax;
    int32_t *row, *col; /* padded floor cell (y0 + 1, x0 + 1); row -1: not splatted */
    double *fx, *fy;
    float *z, *l;
    float *canvas;  /* (h+2, w+2, c+2): sum w c..., sum w z, sum w */
    float *rgb;     /* (c,h,w) of the current frame */
    float *depth;   /* (h,w) */
    uint8_t *mask;  /* (h,w) */
} job_t;

typedef struct {
    job_t *job;
    int64_t lo, hi; /* pass 1: point range; pass 2: padded-row band */
    double lmax;
} task_t;

/* floor of x in [-2, 2^31): exact (x is clamped to the image range before) */
static inline double floor_small(double x) {
    const double t = (double)(int64_t)x;
    return t > x ? t - 1.0 : t;
}

static void *pass1(void *arg) {
    task_t *t = arg;
    job_t *j = t->job;
    const double *P = j->P, *X = j->pts, *Y = j->pts + j->n, *Z = j->pts + 2 * j->n;
    const double wmax = (double)j->w + 1.0, hmax = (double)j->h + 1.0;
    const double wlast = (double)(j->w - 1), hlast = (double)(j->h - 1);
    double lmax = 0.0;
    for (int64_t i = t->lo; i < t->hi; i++) {
        const double z = ((P[8] * X[i] + P[9] * Y[i]) + P[10] * Z[i]) + P[11];
        if (!(z > 0.0)) {
            j->row[i] = -1;
            continue;
        }
        const double xh = ((P[0] * X[i] + P[1] * Y[i]) + P[2] * Z[i]) + P[3];
        const double yh = ((P[4] * X[i] + P[5] * Y[i]) + P[6] * Z[i]) + P[7];
        double x = xh / z - 0.5, y = yh / z - 0.5;
        /* clamp, then snap: the same as snap-then-clamp since the bounds are integers */
        x = x < -2.0 ? -2.0 : (x > wmax ? wmax : x);
        y = y < -2.0 ? -2.0 : (y > hmax ? hmax : y);
        const double rx = floor_small(x + 0.5), ry = floor_small(y + 0.5); /* ties are never within the tolerance */
        if (fabs(x - rx) <= SNAP_TOLERANCE) x = rx;
        if (fabs(y - ry) <= SNAP_TOLERANCE) y = ry;
        const double x0 = floor_small(x), y0 = floor_small(y);
        if (x0 < -1.0 || x0 > wlast || y0 < -1.0 || y0 > hlast) {
            j->row[i] = -1;
            continue;
        }
        const double l = log(1.0 + z);
        j->row[i] = (int32_t)y0 + 1;
        j->col[i] = (int32_t)x0 + 1;
        j->fx[i] = x - x0;
        j->fy[i] = y - y0;
        j->z[i] = (float)z;
        j->l[i] = (float)l;
        if (l > lmax) lmax = l;
    }
    t->lmax = lmax;
    return NULL;
}

static void *pass2(void *arg) {
    task_t *t = arg;
    job_t *j = t->job;
    const int64_t c = j->c, h = j->h, w = j->w, n = j->n, cs = c + 2, rs = (w + 2) * cs;
    const int64_t lo = t->lo, hi = t->hi;
    float *canvas = j->canvas;
    memset(canvas + lo * rs, 0, (size_t)((hi - lo) * rs) * sizeof(float));
    const double factor = j->scale / (j->lmax + 1e-7);
    const int32_t *rows = j->row;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows[i];
        if (r < 0 || r + 1 < lo || r >= hi) continue;
        const double fx = j->fx[i], fy = j->fy[i];
        /* depth weight exp(SHIFT - eta): the common factor exp(SHIFT) cancels in sum(w c) / sum(w) and keeps
         * every non-zero weight (bilinear >= 1e-16 thanks to the snapping) a normal float32 */
        double eta = factor * (double)j->l[i];
        eta = eta < ETA_CAP ? eta : ETA_CAP;
        const double dw = exp(WEIGHT_SHIFT - eta);
        const double gx[2] = {1.0 - fx, fx}, gy[2] = {(1.0 - fy) * dw, fy * dw};
        float v[16];
        for (int64_t ch = 0; ch < c; ch++) v[ch] = j->vals[ch * n + i];
        v[c] = j->z[i];
        for (int dy = 0; dy < 2; dy++) {
            const int64_t rr = r + dy;
            if (rr < lo || rr >= hi) continue;
            float *cell = canvas + rr * rs + (int64_t)j->col[i] * cs;
            for (int dx = 0; dx < 2; dx++) {
                const float wgt = (float)(gx[dx] * gy[dy]);
                float *px = cell + dx * cs;
                for (int64_t ch = 0; ch <= c; ch++) px[ch] += wgt * v[ch];
                px[c + 1] += wgt;
            }
        }
    }
    /* finalise the image rows of this band (padded rows 1..h) */
    const int64_t r0 = lo > 1 ? lo : 1, r1 = hi < h + 1 ? hi : h + 1;
    for (int64_t rr = r0; rr < r1; rr++) {
        const float *line = canvas + rr * rs + cs; /* padded column 1 */
        for (int64_t q = 0; q < w; q++) {
            const float *px = line + q * cs;
            const double sw = px[c + 1];
            const int64_t o = (rr - 1) * w + q;
            const int hit = sw > 0.0;
            j->mask[o] = (uint8_t)hit;
            const double inv = hit ? 1.0 / sw : 0.0;
            for (int64_t ch = 0; ch < c; ch++) j->rgb[ch * h * w + o] = hit ? (float)(px[ch] * inv) : (float)j->hole;
            j->depth[o] = hit ? (float)(px[c] * inv) : 0.0f;
        }
    }
    return NULL;
}

static void run(void *(*fn)(void *), task_t *tasks, int threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, fn, &tasks[t]) == 0;
    fn(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else fn(&tasks[t]); /* could not start a thread: do its share here */
    }
}

/* dims: n, c, h, w, frames
 * ptrs: points (3,n) f64, values (c,n) f32, proj (frames,3,4) f64, params [scale, hole] f64,
 *       rgb out (frames,c,h,w) f32, depth out (frames,1,h,w) f32, mask out (frames,1,h,w) u8 */
int lyra_warp_splat(const int64_t *dims, void **ptrs, int threads) {
    const int64_t n = dims[0], c = dims[1], h = dims[2], w = dims[3], frames = dims[4];
    if (c > 14) return -3;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const double *params = ptrs[3];
    job_t j = {c, h, w, n, ptrs[0], ptrs[1], NULL, params[0], params[1], 0.0};
    const size_t np = (size_t)(n > 0 ? n : 1);
    j.row = malloc(np * sizeof(int32_t));
    j.col = malloc(np * sizeof(int32_t));
    j.fx = malloc(np * sizeof(double));
    j.fy = malloc(np * sizeof(double));
    j.z = malloc(np * sizeof(float));
    j.l = malloc(np * sizeof(float));
    j.canvas = malloc((size_t)((h + 2) * (w + 2) * (c + 2)) * sizeof(float));
    int rc = 0;
    if (!j.row || !j.col || !j.fx || !j.fy || !j.z || !j.l || !j.canvas) rc = -1;
    task_t tasks[MAX_THREADS];
    for (int64_t f = 0; f < frames && rc == 0; f++) {
        j.P = (const double *)ptrs[2] + 12 * f;
        j.rgb = (float *)ptrs[4] + f * c * h * w;
        j.depth = (float *)ptrs[5] + f * h * w;
        j.mask = (uint8_t *)ptrs[6] + f * h * w;
        int t1 = threads;
        if (n < 4096 * (int64_t)t1) t1 = 1;
        for (int t = 0; t < t1; t++) tasks[t] = (task_t){&j, n * t / t1, n * (t + 1) / t1, 0.0};
        run(pass1, tasks, t1);
        j.lmax = 0.0;
        for (int t = 0; t < t1; t++)
            if (tasks[t].lmax > j.lmax) j.lmax = tasks[t].lmax;
        int t2 = threads;
        if (t2 > h + 2) t2 = (int)(h + 2);
        for (int t = 0; t < t2; t++) tasks[t] = (task_t){&j, (h + 2) * t / t2, (h + 2) * (t + 1) / t2, 0.0};
        run(pass2, tasks, t2);
    }
    free(j.row);
    free(j.col);
    free(j.fx);
    free(j.fy);
    free(j.z);
    free(j.l);
    free(j.canvas);
    return rc;
}

/* ------------------------------------------------------------------------------------------ mesh z-buffer */

/* The rasterizer of lyra_ops.mask_refine.mesh_depth (its _rasterize, element by element in the same float64
 * operations, so the z-buffer is bit-identical to the torch one): per triangle, its rows; per row, the column
 * span of the three edge half-planes (widened by a pixel); per candidate pixel, the inside test with the edge
 * tolerance, and the hit depth |det| / (r.n) min-reduced into zbuf.
 * dims: m (triangles), h, w
 * ptrs: e_1, e_2, e_d (m,3) f64 (sign-normalised affine forms), abs_det (m) f64, row_lo, row_hi (m) i64,
 *       zbuf (h*w) f64 (out: the z-depth, 0 where no triangle is hit), params [edge_tolerance] f64 */
typedef struct {
    const int64_t *dims;
    void **ptrs;
    int64_t lo, hi; /* rows of this band */
} mesh_task_t;

static void *mesh_band(void *arg) {
    const mesh_task_t *mt = arg;
    const int64_t m = mt->dims[0], w = mt->dims[2], lo = mt->lo, hi = mt->hi;
    void **ptrs = mt->ptrs;
    const double *e1 = ptrs[0], *e2 = ptrs[1], *ed = ptrs[2], *adet = ptrs[3];
    const int64_t *rlo = ptrs[4], *rhi = ptrs[5];
    double *zbuf = ptrs[6];
    const double tol = ((const double *)ptrs[7])[0];
    for (int64_t p = lo * w; p < hi * w; p++) zbuf[p] = INFINITY;
    for (int64_t t = 0; t < m; t++) {
        const double s1 = e1[3 * t], s2 = e2[3 * t], sd = ed[3 * t];
        const double s0 = (sd - s1) - s2;
        const double slopes[3] = {s1, s2, s0};
        const int64_t first = rlo[t] > lo ? rlo[t] : lo, last = rhi[t] < hi - 1 ? rhi[t] : hi - 1;
        for (int64_t row = first; row <= last; row++) {
            const double v = (double)row + 0.5;
            const double b1 = e1[3 * t + 1] * v + e1[3 * t + 2];
            const double b2 = e2[3 * t + 1] * v + e2[3 * t + 2];
            const double bd = ed[3 * t + 1] * v + ed[3 * t + 2];
            const double icpts[3] = {b1, b2, (bd - b1) - b2};
            double lo_u = -2.0, hi_u = (double)w + 2.0;
            int empty = 0;
            for (int k = 0; k < 3; k++) {
                double bound = -icpts[k] / (slopes[k] == 0.0 ? 1.0 : slopes[k]);
                bound = bound < -2.0 ? -2.0 : (bound > (double)w + 2.0 ? (double)w + 2.0 : bound);
                if (slopes[k] > 0.0 && bound > lo_u) lo_u = bound;
                if (slopes[k] < 0.0 && bound < hi_u) hi_u = bound;
                if (slopes[k] == 0.0 && icpts[k] < 0.0) empty = 1;
            }
            if (empty) continue;
            double cl = ceil(lo_u - 0.5) - 1.0, ch = floor(hi_u - 0.5) + 1.0;
            cl = cl < 0.0 ? 0.0 : (cl > (double)(w - 1) ? (double)(w - 1) : cl);
            ch = ch < -1.0 ? -1.0 : (ch > (double)(w - 1) ? (double)(w - 1) : ch);
            const int64_t col_lo = (int64_t)cl, count = (int64_t)ch - col_lo + 1;
            if (count <= 0) continue;
            const double u0 = (double)col_lo + 0.5;
            const double w1_0 = s1 * u0 + b1, w2_0 = s2 * u0 + b2, d_0 = sd * u0 + bd;
            const double pix0 = (double)(row * w + col_lo);
            for (int64_t k = 0; k < count; k++) {
                const double kk = (double)k;
                const double w1 = w1_0 + s1 * kk, w2 = w2_0 + s2 * kk, d = d_0 + sd * kk;
                const double slack = d * tol;
                if (w1 >= -slack && w2 >= -slack && (d - w1) - w2 >= -slack && d > 0.0) {
                    const int64_t p = (int64_t)(pix0 + kk);
                    const double z = adet[t] / d;
                    if (z < zbuf[p]) zbuf[p] = z;
                }
            }
        }
    }
    for (int64_t p = lo * w; p < hi * w; p++)
        if (isinf(zbuf[p])) zbuf[p] = 0.0;
    return NULL;
}

/* Threads take bands of rows; a minimum does not depend on the order, so neither does the result. */
int lyra_mesh_depth(const int64_t *dims, void **ptrs, int threads) {
    const int64_t h = dims[1];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > h) threads = (int)h;
    mesh_task_t tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) tasks[t] = (mesh_task_t){dims, ptrs, h * t / threads, h * (t + 1) / threads};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, mesh_band, &tasks[t]) == 0;
    mesh_band(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else mesh_band(&tasks[t]);
    }
    return 0;
}

/* Conservative masking of one warped frame: out = in, except where the mesh depth z (f64, 0: no hit) satisfies
 * z > 0 and z + threshold < depth (the warped depth, as f64): there mask 0, rgb hole, depth 0.
 * dims: c, h*w
 * ptrs: z (h*w) f64, rgb in (c,h*w) f32, depth in (h*w) f32, mask in (h*w) u8, rgb out, depth out, mask out,
 *       params [threshold, hole] f64 */
int lyra_refine_apply(const int64_t *dims, void **ptrs) {
    const int64_t c = dims[0], hw = dims[1];
    const double *z = ptrs[0], *params = ptrs[7];
    const float *rgb = ptrs[1], *depth = ptrs[2];
    const uint8_t *mask = ptrs[3];
    float *orgb = ptrs[4], *odepth = ptrs[5];
    uint8_t *omask = ptrs[6];
    const double thr = params[0];
    const float hole = (float)params[1];
    uint8_t bad[4096];
    for (int64_t p0 = 0; p0 < hw; p0 += 4096) {
        const int64_t p1 = p0 + 4096 < hw ? p0 + 4096 : hw;
        for (int64_t p = p0; p < p1; p++) {
            const uint8_t b = z[p] > 0.0 && z[p] + thr < (double)depth[p];
            bad[p - p0] = b;
            omask[p] = b ? 0 : mask[p];
            odepth[p] = b ? 0.0f : depth[p];
        }
        for (int64_t ch = 0; ch < c; ch++)
            for (int64_t p = p0; p < p1; p++) orgb[ch * hw + p] = bad[p - p0] ? hole : rgb[ch * hw + p];
    }
    return 0;
}

/* CPU kernels of lyra_ops.rasterize (float32): gsplat 1.5.3's per-tile forward and backward, the EWA projection
 * and the tile binning.
 *
 * Built and loaded at run time by lyra_ops/raster_kernel.py (plain C, no Python or torch headers; called through
 * ctypes). Every (camera, tile) is composited by one thread, its Gaussians front to back, each evaluated only at
 * the pixels of its radius box (the box holds every pixel where its alpha >= 1/255). A tile's results depend on
 * nothing but its own pairs, so any number of threads and any schedule give the same bytes; the per-Gaussian
 * gradient sums run serially in pair order after the threads joined (no atomics anywhere).
 *
 * Per pixel (centre x + 0.5, y + 0.5), pairs in depth order:
 *   dx = mx - px, dy = my - py, sigma = 0.5 (a dx^2 + c dy^2) + b dx dy; skipped when sigma < 0;
 *   alpha = min(0.999, o exp(-min(sigma, 80))); skipped when alpha < 1/255;
 *   the pixel stops (exclusively) at the first pair with T (1 - alpha) <= 1e-4;
 *   acc += alpha T [r, g, b, z]; T *= 1 - alpha.
 * The backward walks each tile back to front, recovering T by division (as gsplat does). Binning (serial):
 * every valid (camera, Gaussian) radix-sorted by depth (stable: ties in index order), then counted into its tiles:
 * the pairs of lyra_ops.rasterize._intersect_tiles, in the same order.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALPHA_MIN (1.0f / 255.0f)
#define ALPHA_MAX 0.999f
#define T_MIN 1e-4f
#define SIGMA_MAX 80.0f
#define BOX_GUARD 1e-3f   /* pixels */
#define LEVEL_GUARD 1e-3f /* sigma */
#define NF 4     /* composited features: r, g, b, depth */
#define NG 10    /* per-pair gradient sums: r g b z | opacity | conic a b c | mean x y */

typedef struct {
    /* geometry */
    int64_t n_gauss;        /* Gaussians per camera (N): colour and opacity index = gid % N */
    int32_t tiles_x, tiles_y, tile_size, width, height;
    int64_t n_tiles;        /* cameras x tiles_x x tiles_y */
    const int64_t *offsets; /* (n_tiles + 1) pair ranges per tile */
    const int64_t *order;   /* (n_tiles) tiles in the order threads take them (longest first) */
    const int64_t *gid;     /* (K) flat camera * N + n of each pair, sorted by (camera, tile, depth) */
    const float *means2d;   /* (C*N, 2) */
    const float *conics;    /* (C*N, 3) */
    const float *opacities; /* (N) */
    const float *colors;    /* (N, 3) */
    const float *depths;    /* (C*N) */
    const int32_t *radii;   /* (C*N, 2) */
    /* forward outputs (image layout) */
    float *acc;             /* (C, 4, H, W) */
    float *trans;           /* (C, H, W) final transmittance */
    int32_t *stop;          /* (C, H, W) pairs of its tile a pixel went through (its stop index) */
    /* backward */
    const float *grad_acc;  /* (C, 4, H, W) */
    const float *grad_trans;/* (C, H, W) */
    float *pair_grads;      /* (K, NG) */
    /* scheduling */
    int64_t next;           /* shared tile counter */
    int failed;
} Job;

/* Where one pair can reach alpha >= 1/255 inside its tile: its radius box (which holds every such pixel) cut to
 * the tile, rows [y0, y1) and per row the columns of row_span (widened by a guard, so rounding never drops a
 * pixel: the alpha test decides). Forward and backward use the same spans. Each pixel first compares sigma with
 * the level L = ln(255 o) (+ a guard) beyond which alpha < 1/255, and skips the exp there. (Cutting the box to
 * the ellipse sigma <= L, a sqrt per row, measured ~10% slower for Gaussians of a few pixels.) */
typedef struct {
    float mx, level;
    int32_t tx0, tx1, y0, y1;
} Footprint;

static Footprint footprint(float mx, float my, float o, int32_t ry, int32_t tx0, int32_t tx1, int32_t ty0,
                           int32_t ty1) {
    Footprint f;
    f.mx = mx, f.tx0 = tx0, f.tx1 = tx1;
    f.level = logf(o / ALPHA_MIN) + LEVEL_GUARD;
    const float ly = ceilf(my - (float)ry - 0.5f - BOX_GUARD), hy = floorf(my + (float)ry - 0.5f + BOX_GUARD) + 1.0f;
    f.y0 = ly > (float)ty0 ? (int32_t)ly : ty0;
    f.y1 = hy < (float)ty1 ? (int32_t)hy : ty1;
    if (f.y1 < f.y0) f.y1 = f.y0;
    return f;
}

/* Columns [*x0, *x1) of the radius box inside the tile. */
static inline void row_span(const Footprint *f, int32_t rx, int32_t *x0, int32_t *x1) {
    const float lx = ceilf(f->mx - (float)rx - 0.5f - BOX_GUARD), hx = floorf(f->mx + (float)rx - 0.5f + BOX_GUARD) + 1.0f;
    *x0 = lx > (float)f->tx0 ? (int32_t)lx : f->tx0;
    *x1 = hx < (float)f->tx1 ? (int32_t)hx : f->tx1;
    if (*x1 < *x0) *x1 = *x0;
}

static int64_t take_tile(Job *job) {
    return __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Forward                                                                                                    */
/* ---------------------------------------------------------------------------------------------------------- */

static void forward_tile(Job *job, int64_t tile, float *T, float *acc, int32_t *stop) {
    const int32_t ts = job->tile_size, W = job->width, H = job->height;
    const int64_t per_cam = (int64_t)job->tiles_x * job->tiles_y;
    const int64_t cam = tile / per_cam, local = tile % per_cam;
    const int32_t tx0 = (int32_t)(local % job->tiles_x) * ts, ty0 = (int32_t)(local / job->tiles_x) * ts;
    const int32_t tx1 = tx0 + ts < W ? tx0 + ts : W, ty1 = ty0 + ts < H ? ty0 + ts : H;
    const int32_t tw = tx1 - tx0, th = ty1 - ty0, P = tw * th;
    const int64_t begin = job->offsets[tile], end = job->offsets[tile + 1], count = end - begin;
    for (int32_t p = 0; p < P; p++) {
        T[p] = 1.0f;
        stop[p] = (int32_t)count;
        for (int f = 0; f < NF; f++) acc[p * NF + f] = 0.0f;
    }
    int32_t live = P;
    for (int64_t k = begin; k < end && live > 0; k++) {
        const int64_t g = job->gid[k], n = g % job->n_gauss;
        const float mx = job->means2d[2 * g], my = job->means2d[2 * g + 1];
        const float ca = job->conics[3 * g], cb = job->conics[3 * g + 1], cc = job->conics[3 * g + 2];
        const float o = job->opacities[n];
        const float feat[NF] = {job->colors[3 * n], job->colors[3 * n + 1], job->colors[3 * n + 2], job->depths[g]};
        const int32_t rx = job->radii[2 * g];
        const Footprint fp = footprint(mx, my, o, job->radii[2 * g + 1], tx0, tx1, ty0, ty1);
        for (int32_t y = fp.y0; y < fp.y1; y++) {
            const float dy = my - ((float)y + 0.5f);
            int32_t x0, x1;
            row_span(&fp, rx, &x0, &x1);
            for (int32_t x = x0; x < x1; x++) {
                const int32_t p = (y - ty0) * tw + (x - tx0);
                if (stop[p] != (int32_t)count) continue;  /* already stopped */
                const float dx = mx - ((float)x + 0.5f);
                const float sigma = 0.5f * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
                if (sigma < 0.0f || sigma > fp.level) continue;  /* beyond the level: alpha < 1/255 */
                float alpha = o * expf(-(sigma < SIGMA_MAX ? sigma : SIGMA_MAX));
                if (alpha > ALPHA_MAX) alpha = ALPHA_MAX;
                if (alpha < ALPHA_MIN) continue;
                const float t_next = T[p] * (1.0f - alpha);
                if (t_next <= T_MIN) {
                    stop[p] = (int32_t)(k - begin);
                    live--;
                    continue;
                }
                const float w = alpha * T[p];
                for (int f = 0; f < NF; f++) acc[p * NF + f] += w * feat[f];
                T[p] = t_next;
            }
        }
    }
    const int64_t plane = (int64_t)H * W;
    for (int32_t y = ty0; y < ty1; y++) {
        for (int32_t x = tx0; x < tx1; x++) {
            const int32_t p = (y - ty0) * tw + (x - tx0);
            const int64_t pix = (int64_t)y * W + x;
            for (int f = 0; f < NF; f++) job->acc[(cam * NF + f) * plane + pix] = acc[p * NF + f];
            job->trans[cam * plane + pix] = T[p];
            job->stop[cam * plane + pix] = stop[p];
        }
    }
}

static void *forward_worker(void *arg) {
    Job *job = (Job *)arg;
    const int64_t P = (int64_t)job->tile_size * job->tile_size;
    float *T = malloc(sizeof(float) * P), *acc = malloc(sizeof(float) * P * NF);
    int32_t *stop = malloc(sizeof(int32_t) * P);
    if (!T || !acc || !stop) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    } else {
        for (int64_t i = take_tile(job); i < job->n_tiles; i = take_tile(job)) forward_tile(job, job->order[i], T, acc, stop);
    }
    free(T);
    free(acc);
    free(stop);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Backward                                                                                                   */
/* ---------------------------------------------------------------------------------------------------------- */

static void backward_tile(Job *job, int64_t tile, float *T, float *S, float *gpix, int32_t *stop) {
    const int32_t ts = job->tile_size, W = job->width, H = job->height;
    const int64_t per_cam = (int64_t)job->tiles_x * job->tiles_y;
    const int64_t cam = tile / per_cam, local = tile % per_cam;
    const int32_t tx0 = (int32_t)(local % job->tiles_x) * ts, ty0 = (int32_t)(local / job->tiles_x) * ts;
    const int32_t tx1 = tx0 + ts < W ? tx0 + ts : W, ty1 = ty0 + ts < H ? ty0 + ts : H;
    const int32_t tw = tx1 - tx0;
    const int64_t begin = job->offsets[tile];
    const int64_t plane = (int64_t)H * W;
    int32_t last = 0;  /* pairs beyond every pixel's stop index contribute nothing */
    for (int32_t y = ty0; y < ty1; y++) {
        for (int32_t x = tx0; x < tx1; x++) {
            const int32_t p = (y - ty0) * tw + (x - tx0);
            const int64_t pix = (int64_t)y * W + x;
            T[p] = job->trans[cam * plane + pix];
            S[p] = 0.0f;
            stop[p] = job->stop[cam * plane + pix];
            if (stop[p] > last) last = stop[p];
            for (int f = 0; f < NF; f++) gpix[p * (NF + 1) + f] = job->grad_acc[(cam * NF + f) * plane + pix];
            gpix[p * (NF + 1) + NF] = -job->grad_trans[cam * plane + pix];  /* the constant feature 1 - T */
        }
    }
    for (int64_t k = begin + last - 1; k >= begin; k--) {
        const int32_t rank = (int32_t)(k - begin);
        const int64_t g = job->gid[k], n = g % job->n_gauss;
        const float mx = job->means2d[2 * g], my = job->means2d[2 * g + 1];
        const float ca = job->conics[3 * g], cb = job->conics[3 * g + 1], cc = job->conics[3 * g + 2];
        const float o = job->opacities[n];
        const float feat[NF + 1] = {job->colors[3 * n], job->colors[3 * n + 1], job->colors[3 * n + 2],
                                    job->depths[g], 1.0f};
        float sum[NG] = {0};
        const int32_t rx = job->radii[2 * g];
        const Footprint fp = footprint(mx, my, o, job->radii[2 * g + 1], tx0, tx1, ty0, ty1);
        for (int32_t y = fp.y0; y < fp.y1; y++) {
            const float dy = my - ((float)y + 0.5f);
            int32_t x0, x1;
            row_span(&fp, rx, &x0, &x1);
            for (int32_t x = x0; x < x1; x++) {
                const int32_t p = (y - ty0) * tw + (x - tx0);
                if (rank >= stop[p]) continue;
                const float dx = mx - ((float)x + 0.5f);
                const float sigma = 0.5f * (ca * dx * dx + cc * dy * dy) + cb * dx * dy;
                if (sigma < 0.0f || sigma > fp.level) continue;  /* beyond the level: alpha < 1/255 */
                const float e = expf(-(sigma < SIGMA_MAX ? sigma : SIGMA_MAX));
                const float raw = o * e;
                const float alpha = raw > ALPHA_MAX ? ALPHA_MAX : raw;
                if (alpha < ALPHA_MIN) continue;
                const float ra = 1.0f / (1.0f - alpha);
                const float t = T[p] * ra;  /* transmittance before this pair */
                const float w = alpha * t;
                const float *gp = gpix + p * (NF + 1);
                float fg = 0.0f;
                for (int f = 0; f <= NF; f++) fg += feat[f] * gp[f];
                const float d_alpha = t * fg - S[p] * ra;
                S[p] += w * fg;
                T[p] = t;
                for (int f = 0; f < NF; f++) sum[f] += w * gp[f];
                if (raw < ALPHA_MAX) {
                    const float v_sigma = -d_alpha * alpha;
                    sum[4] += d_alpha * e;
                    sum[5] += 0.5f * dx * dx * v_sigma;
                    sum[6] += dx * dy * v_sigma;
                    sum[7] += 0.5f * dy * dy * v_sigma;
                    sum[8] += v_sigma * (ca * dx + cb * dy);
                    sum[9] += v_sigma * (cb * dx + cc * dy);
                }
            }
        }
        memcpy(job->pair_grads + k * NG, sum, sizeof(sum));
    }
}

static void *backward_worker(void *arg) {
    Job *job = (Job *)arg;
    const int64_t P = (int64_t)job->tile_size * job->tile_size;
    float *T = malloc(sizeof(float) * P), *S = malloc(sizeof(float) * P);
    float *gpix = malloc(sizeof(float) * P * (NF + 1));
    int32_t *stop = malloc(sizeof(int32_t) * P);
    if (!T || !S || !gpix || !stop) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
    } else {
        for (int64_t i = take_tile(job); i < job->n_tiles; i = take_tile(job))
            backward_tile(job, job->order[i], T, S, gpix, stop);
    }
    free(T);
    free(S);
    free(gpix);
    free(stop);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Projection (EWA, as lyra_ops.rasterize.project_gaussians)                                                   */
/* ---------------------------------------------------------------------------------------------------------- */

typedef struct {
    int64_t n, cams;
    int32_t width, height;
    float near_plane, far_plane, eps2d;
    const float *means, *quats, *scales, *opacities, *viewmats, *Ks;  /* (N,3) (N,4) (N,3) (N) (C,4,4) (C,3,3) */
    float *means2d, *conics, *depths;                                 /* (C,N,2) (C,N,3) (C,N) */
    int32_t *radii;                                                   /* (C,N,2) */
    uint8_t *valid;                                                   /* (C,N) */
    const float *v_means2d, *v_conics, *v_depths;                     /* backward inputs */
    float *v_means, *v_quats, *v_scales;                              /* backward outputs (N,3) (N,4) (N,3) */
    int64_t next;
    int32_t chunk;
} Proj;

static void quat_rotmat(const float *q, float *qn, float *norm, float R[9]) {
    float n = sqrtf(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    if (n < 1e-12f) n = 1e-12f;
    const float w = q[0] / n, x = q[1] / n, y = q[2] / n, z = q[3] / n;
    qn[0] = w, qn[1] = x, qn[2] = y, qn[3] = z;
    *norm = n;
    R[0] = 1 - 2 * (y * y + z * z), R[1] = 2 * (x * y - w * z), R[2] = 2 * (x * z + w * y);
    R[3] = 2 * (x * y + w * z), R[4] = 1 - 2 * (x * x + z * z), R[5] = 2 * (y * z - w * x);
    R[6] = 2 * (x * z - w * y), R[7] = 2 * (y * z + w * x), R[8] = 1 - 2 * (x * x + y * y);
}

/* Everything the forward computes for one (camera, Gaussian), kept for the backward's recomputation. */
typedef struct {
    float mc[3], A[9], u, v, uc, vc, gx, gy, r0[3], r1[3], cxx, cxy, cyy, det;
    int in_u, in_v, valid;
} ProjState;

static void project_one(const Proj *pj, int64_t c, int64_t n, const float M[9], ProjState *s) {
    const float *V = pj->viewmats + 16 * c, *K = pj->Ks + 9 * c, *mu = pj->means + 3 * n;
    const float fx = K[0], fy = K[4], cx = K[2], cy = K[5];
    const float W = (float)pj->width, H = (float)pj->height;
    for (int i = 0; i < 3; i++) {
        s->mc[i] = V[4 * i] * mu[0] + V[4 * i + 1] * mu[1] + V[4 * i + 2] * mu[2] + V[4 * i + 3];
        for (int j = 0; j < 3; j++) s->A[3 * i + j] = V[4 * i] * M[j] + V[4 * i + 1] * M[3 + j] + V[4 * i + 2] * M[6 + j];
    }
    const float z = s->mc[2];
    s->valid = z >= pj->near_plane && z <= pj->far_plane && pj->opacities[n] >= ALPHA_MIN;
    if (!s->valid) return;
    s->u = s->mc[0] / z, s->v = s->mc[1] / z;
    const float lxp = (W - cx) / fx + 0.3f * (0.5f * W / fx), lxn = cx / fx + 0.3f * (0.5f * W / fx);
    const float lyp = (H - cy) / fy + 0.3f * (0.5f * H / fy), lyn = cy / fy + 0.3f * (0.5f * H / fy);
    s->in_u = s->u >= -lxn && s->u <= lxp;
    s->in_v = s->v >= -lyn && s->v <= lyp;
    s->uc = s->u < -lxn ? -lxn : (s->u > lxp ? lxp : s->u);
    s->vc = s->v < -lyn ? -lyn : (s->v > lyp ? lyp : s->v);
    s->gx = fx / z, s->gy = fy / z;
    for (int j = 0; j < 3; j++) {
        s->r0[j] = s->gx * (s->A[j] - s->uc * s->A[6 + j]);
        s->r1[j] = s->gy * (s->A[3 + j] - s->vc * s->A[6 + j]);
    }
    s->cxx = s->r0[0] * s->r0[0] + s->r0[1] * s->r0[1] + s->r0[2] * s->r0[2] + pj->eps2d;
    s->cxy = s->r0[0] * s->r1[0] + s->r0[1] * s->r1[1] + s->r0[2] * s->r1[2];
    s->cyy = s->r1[0] * s->r1[0] + s->r1[1] * s->r1[1] + s->r1[2] * s->r1[2] + pj->eps2d;
    s->det = s->cxx * s->cyy - s->cxy * s->cxy;
    s->valid = s->det > 0.0f;
}

static void project_range(Proj *pj, int64_t n0, int64_t n1) {
    const float W = (float)pj->width, H = (float)pj->height;
    for (int64_t n = n0; n < n1; n++) {
        float qn[4], qnorm, R[9], M[9];
        quat_rotmat(pj->quats + 4 * n, qn, &qnorm, R);
        for (int i = 0; i < 9; i++) M[i] = R[i] * pj->scales[3 * n + i % 3];
        const float o = pj->opacities[n];
        float extend = sqrtf(2.0f * logf(o / ALPHA_MIN > 1.0f ? o / ALPHA_MIN : 1.0f));
        if (extend > 3.33f) extend = 3.33f;
        for (int64_t c = 0; c < pj->cams; c++) {
            const int64_t i = c * pj->n + n;
            ProjState s;
            project_one(pj, c, n, M, &s);
            pj->depths[i] = s.mc[2];
            float mx = 0, my = 0, rx = 0, ry = 0;
            if (s.valid) {
                const float *K = pj->Ks + 9 * c;
                mx = K[0] * s.u + K[2], my = K[4] * s.v + K[5];
                rx = ceilf(extend * sqrtf(s.cxx > 0 ? s.cxx : 0)), ry = ceilf(extend * sqrtf(s.cyy > 0 ? s.cyy : 0));
                s.valid = (rx > 0 || ry > 0) && mx + rx > 0 && mx - rx < W && my + ry > 0 && my - ry < H;
            }
            pj->valid[i] = (uint8_t)s.valid;
            pj->means2d[2 * i] = mx, pj->means2d[2 * i + 1] = my;
            pj->conics[3 * i] = s.valid ? s.cyy / s.det : 0, pj->conics[3 * i + 1] = s.valid ? -s.cxy / s.det : 0;
            pj->conics[3 * i + 2] = s.valid ? s.cxx / s.det : 0;
            pj->radii[2 * i] = s.valid ? (int32_t)rx : 0, pj->radii[2 * i + 1] = s.valid ? (int32_t)ry : 0;
        }
    }
}

static void project_backward_range(Proj *pj, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        float qn[4], qnorm, R[9], M[9], vM[9] = {0}, vmu[3] = {0};
        const float *sc = pj->scales + 3 * n;
        quat_rotmat(pj->quats + 4 * n, qn, &qnorm, R);
        for (int i = 0; i < 9; i++) M[i] = R[i] * sc[i % 3];
        for (int64_t c = 0; c < pj->cams; c++) {
            const int64_t i = c * pj->n + n;
            if (!pj->valid[i]) continue;
            ProjState s;
            project_one(pj, c, n, M, &s);
            const float *V = pj->viewmats + 16 * c, *K = pj->Ks + 9 * c;
            const float fx = K[0], fy = K[4], z = s.mc[2];
            /* conic = (cyy, -cxy, cxx) / det */
            const float va = pj->v_conics[3 * i], vb = pj->v_conics[3 * i + 1], vc = pj->v_conics[3 * i + 2];
            const float v_det = -(va * s.cyy - vb * s.cxy + vc * s.cxx) / (s.det * s.det);
            const float v_xx = vc / s.det + v_det * s.cyy, v_yy = va / s.det + v_det * s.cxx;
            const float v_xy = -vb / s.det - 2.0f * v_det * s.cxy;
            float vr0[3], vr1[3], vA[9] = {0}, vmc[3] = {0};
            for (int j = 0; j < 3; j++) {
                vr0[j] = 2.0f * v_xx * s.r0[j] + v_xy * s.r1[j];
                vr1[j] = 2.0f * v_yy * s.r1[j] + v_xy * s.r0[j];
            }
            /* r0 = gx (A0 - uc A2), r1 = gy (A1 - vc A2) */
            float v_gx = 0, v_gy = 0, v_uc = 0, v_vc = 0;
            for (int j = 0; j < 3; j++) {
                v_gx += vr0[j] * (s.A[j] - s.uc * s.A[6 + j]);
                v_gy += vr1[j] * (s.A[3 + j] - s.vc * s.A[6 + j]);
                v_uc -= s.gx * vr0[j] * s.A[6 + j];
                v_vc -= s.gy * vr1[j] * s.A[6 + j];
                vA[j] = s.gx * vr0[j];
                vA[3 + j] = s.gy * vr1[j];
                vA[6 + j] = -s.gx * s.uc * vr0[j] - s.gy * s.vc * vr1[j];
            }
            float v_u = (s.in_u ? v_uc : 0.0f) + fx * pj->v_means2d[2 * i];
            float v_v = (s.in_v ? v_vc : 0.0f) + fy * pj->v_means2d[2 * i + 1];
            vmc[0] = v_u / z;
            vmc[1] = v_v / z;
            vmc[2] = pj->v_depths[i] - v_u * s.mc[0] / (z * z) - v_v * s.mc[1] / (z * z) - v_gx * fx / (z * z) -
                     v_gy * fy / (z * z);
            for (int a = 0; a < 3; a++) {  /* mc = Rv mu + t, A = Rv M */
                for (int b = 0; b < 3; b++) {
                    vmu[a] += V[4 * b + a] * vmc[b];
                    for (int j = 0; j < 3; j++) vM[3 * a + j] += V[4 * b + a] * vA[3 * b + j];
                }
            }
        }
        float vR[9], vs[3] = {0};
        for (int a = 0; a < 9; a++) {  /* M = R diag(s) */
            vR[a] = vM[a] * sc[a % 3];
            vs[a % 3] += vM[a] * R[a];
        }
        const float w = qn[0], x = qn[1], y = qn[2], zq = qn[3];
        float vq[4];
        vq[0] = 2 * (-zq * vR[1] + y * vR[2] + zq * vR[3] - x * vR[5] - y * vR[6] + x * vR[7]);
        vq[1] = 2 * (y * vR[1] + zq * vR[2] + y * vR[3] - 2 * x * vR[4] - w * vR[5] + zq * vR[6] + w * vR[7] -
                     2 * x * vR[8]);
        vq[2] = 2 * (-2 * y * vR[0] + x * vR[1] + w * vR[2] + x * vR[3] + zq * vR[5] - w * vR[6] + zq * vR[7] -
                     2 * y * vR[8]);
        vq[3] = 2 * (-2 * zq * vR[0] - w * vR[1] + x * vR[2] + w * vR[3] - 2 * zq * vR[4] + y * vR[5] + x * vR[6] +
                     y * vR[7]);
        const float dot = qn[0] * vq[0] + qn[1] * vq[1] + qn[2] * vq[2] + qn[3] * vq[3];
        for (int j = 0; j < 4; j++) pj->v_quats[4 * n + j] = (vq[j] - qn[j] * dot) / qnorm;
        for (int j = 0; j < 3; j++) {
            pj->v_means[3 * n + j] = vmu[j];
            pj->v_scales[3 * n + j] = vs[j];
        }
    }
}

static void *project_worker(void *arg) {
    Proj *pj = (Proj *)arg;
    for (;;) {
        const int64_t n0 = __atomic_fetch_add(&pj->next, pj->chunk, __ATOMIC_RELAXED);
        if (n0 >= pj->n) break;
        const int64_t n1 = n0 + pj->chunk < pj->n ? n0 + pj->chunk : pj->n;
        if (pj->v_means) project_backward_range(pj, n0, n1);
        else project_range(pj, n0, n1);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Entry points                                                                                               */
/* ---------------------------------------------------------------------------------------------------------- */

/* Runs worker(job) on `threads` threads that pull work from the job's shared counter. Built with OpenMP (the
 * default), the threads are those of the process's OpenMP pool, which torch's own parallel ops use too: no
 * second set of threads competes with torch's (still spinning) workers for the cores. Without OpenMP, POSIX
 * threads. Either way the result does not depend on how many threads ran or which took what. */
static int run_threads(void *job, void *(*worker)(void *), int threads, const int *failed) {
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        worker(job);
    } else {
        worker(job);
    }
#else
    pthread_t ids[256];
    int started = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[started], NULL, worker, job) != 0) break;  /* fewer threads: same result */
        started++;
    }
    worker(job);
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
#endif
    return failed && *failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Tile binning (as lyra_ops.rasterize._intersect_tiles)                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

/* Tile range [x0, x1) x [y0, y1) of entry i's radius box, with the float operations of _intersect_tiles. */
static inline void tile_range(const float *means2d, const int32_t *radii, int64_t i, int32_t ts, int32_t tiles_x,
                              int32_t tiles_y, int32_t *x0, int32_t *x1, int32_t *y0, int32_t *y1) {
    const float t = (float)ts;
    const float mx = means2d[2 * i] / t, my = means2d[2 * i + 1] / t;
    const float rx = (float)radii[2 * i] / t, ry = (float)radii[2 * i + 1] / t;
    float lx = floorf(mx - rx), ly = floorf(my - ry), hx = ceilf(mx + rx), hy = ceilf(my + ry);
    lx = lx < 0 ? 0 : (lx > tiles_x ? tiles_x : lx);
    hx = hx < 0 ? 0 : (hx > tiles_x ? tiles_x : hx);
    ly = ly < 0 ? 0 : (ly > tiles_y ? tiles_y : ly);
    hy = hy < 0 ? 0 : (hy > tiles_y ? tiles_y : hy);
    *x0 = (int32_t)lx, *x1 = (int32_t)hx, *y0 = (int32_t)ly, *y1 = (int32_t)hy;
    if (*x1 < *x0) *x1 = *x0;
    if (*y1 < *y0) *y1 = *y0;
}

/* dims: N, cameras, tile_size, tiles_x, tiles_y; ptr: means2d (C*N,2) float, radii (C*N,2) int32, valid (C*N)
 * uint8, counts (C*tiles) int64 (written): the pairs of every tile. */
int lyra_bin_count(const int64_t *dims, const void *const *ptr) {
    const int64_t total = dims[0] * dims[1];
    const int32_t ts = (int32_t)dims[2], tiles_x = (int32_t)dims[3], tiles_y = (int32_t)dims[4];
    const int64_t per_cam = (int64_t)tiles_x * tiles_y;
    const float *means2d = ptr[0];
    const int32_t *radii = ptr[1];
    const uint8_t *valid = ptr[2];
    int64_t *counts = (int64_t *)ptr[3];
    memset(counts, 0, sizeof(int64_t) * (size_t)(per_cam * dims[1]));
    for (int64_t i = 0; i < total; i++) {
        if (!valid[i]) continue;
        int32_t x0, x1, y0, y1;
        tile_range(means2d, radii, i, ts, tiles_x, tiles_y, &x0, &x1, &y0, &y1);
        int64_t *row = counts + (i / dims[0]) * per_cam;
        for (int32_t y = y0; y < y1; y++)
            for (int32_t x = x0; x < x1; x++) row[(int64_t)y * tiles_x + x]++;
    }
    return 0;
}

/* Order-preserving uint32 key of a float (non-NaN): a < b <=> key(a) < key(b). */
static inline uint32_t float_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* dims as lyra_bin_count; ptr: means2d, radii, valid, depths (C*N) float, offsets (C*tiles + 1) int64 (the
 * exclusive prefix sums of lyra_bin_count's counts), gid (K) int64 (written). Every tile's pairs, front to back
 * (ties by flat index c*N + n, as a stable sort), into gid[offsets[t] .. offsets[t+1]). Returns -1 when out of
 * memory. */
int lyra_bin_fill(const int64_t *dims, const void *const *ptr) {
    const int64_t total = dims[0] * dims[1];
    const int32_t ts = (int32_t)dims[2], tiles_x = (int32_t)dims[3], tiles_y = (int32_t)dims[4];
    const int64_t per_cam = (int64_t)tiles_x * tiles_y, n_tiles = per_cam * dims[1];
    const float *means2d = ptr[0], *depths = ptr[3];
    const int32_t *radii = ptr[1];
    const uint8_t *valid = ptr[2];
    const int64_t *offsets = ptr[4];
    int64_t *gid = (int64_t *)ptr[5];
    int64_t m = 0;
    for (int64_t i = 0; i < total; i++) m += valid[i] != 0;
    int64_t *a = malloc(sizeof(int64_t) * (size_t)(m ? m : 1)), *b = malloc(sizeof(int64_t) * (size_t)(m ? m : 1));
    uint32_t *ka = malloc(sizeof(uint32_t) * (size_t)(m ? m : 1)), *kb = malloc(sizeof(uint32_t) * (size_t)(m ? m : 1));
    int64_t *cursor = malloc(sizeof(int64_t) * (size_t)(n_tiles ? n_tiles : 1));
    if (!a || !b || !ka || !kb || !cursor) {
        free(a), free(b), free(ka), free(kb), free(cursor);
        return -1;
    }
    m = 0;
    for (int64_t i = 0; i < total; i++) {
        if (!valid[i]) continue;
        a[m] = i;
        ka[m++] = float_key(depths[i]);
    }
    /* stable LSD radix sort by depth, 4 passes of 8 bits (equal depths keep index order) */
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t hist[257] = {0};
        for (int64_t j = 0; j < m; j++) hist[((ka[j] >> shift) & 255u) + 1]++;
        for (int d = 0; d < 256; d++) hist[d + 1] += hist[d];
        for (int64_t j = 0; j < m; j++) {
            const int64_t at = hist[(ka[j] >> shift) & 255u]++;
            b[at] = a[j];
            kb[at] = ka[j];
        }
        int64_t *ti = a;
        a = b, b = ti;
        uint32_t *tk = ka;
        ka = kb, kb = tk;
    }
    memcpy(cursor, offsets, sizeof(int64_t) * (size_t)n_tiles);
    for (int64_t j = 0; j < m; j++) {  /* front to back: each tile's pairs come out in depth order */
        const int64_t i = a[j];
        int32_t x0, x1, y0, y1;
        tile_range(means2d, radii, i, ts, tiles_x, tiles_y, &x0, &x1, &y0, &y1);
        int64_t *row = cursor + (i / dims[0]) * per_cam;
        for (int32_t y = y0; y < y1; y++)
            for (int32_t x = x0; x < x1; x++) gid[row[(int64_t)y * tiles_x + x]++] = i;
    }
    free(a), free(b), free(ka), free(kb), free(cursor);
    return 0;
}

/* Per-pair pointers are passed as one array so the ctypes signature stays short. */
static void fill(Job *job, const int64_t *dims, const void *const *ptr) {
    memset(job, 0, sizeof(*job));
    job->n_gauss = dims[0];
    job->tiles_x = (int32_t)dims[1];
    job->tiles_y = (int32_t)dims[2];
    job->tile_size = (int32_t)dims[3];
    job->width = (int32_t)dims[4];
    job->height = (int32_t)dims[5];
    job->n_tiles = dims[6];
    job->offsets = ptr[0];
    job->order = ptr[1];
    job->gid = ptr[2];
    job->means2d = ptr[3];
    job->conics = ptr[4];
    job->opacities = ptr[5];
    job->colors = ptr[6];
    job->depths = ptr[7];
    job->radii = ptr[8];
    job->acc = (float *)ptr[9];
    job->trans = (float *)ptr[10];
    job->stop = (int32_t *)ptr[11];
}

int lyra_raster_forward(const int64_t *dims, const void *const *ptr, int threads) {
    Job job;
    fill(&job, dims, ptr);
    return run_threads(&job, forward_worker, threads, &job.failed);
}

/* ptr[12..14]: grad_acc, grad_trans, pair_grads (K, NG) scratch; ptr[15..19]: outputs g_means2d (C*N, 2),
 * g_conics (C*N, 3), g_opacities (N), g_colors (N, 3), g_depths (C*N), zero-filled by the caller. */
int lyra_raster_backward(const int64_t *dims, const void *const *ptr, int threads) {
    Job job;
    fill(&job, dims, ptr);
    job.grad_acc = ptr[12];
    job.grad_trans = ptr[13];
    job.pair_grads = (float *)ptr[14];
    const int64_t pairs = job.offsets[job.n_tiles];
    memset(job.pair_grads, 0, sizeof(float) * NG * (size_t)pairs);
    if (run_threads(&job, backward_worker, threads, &job.failed) != 0) return -1;
    float *g_means = (float *)ptr[15], *g_conics = (float *)ptr[16], *g_opac = (float *)ptr[17];
    float *g_colors = (float *)ptr[18], *g_depths = (float *)ptr[19];
    for (int64_t k = 0; k < pairs; k++) {  /* serial, in pair order: deterministic */
        const float *s = job.pair_grads + k * NG;
        const int64_t g = job.gid[k], n = g % job.n_gauss;
        g_colors[3 * n] += s[0];
        g_colors[3 * n + 1] += s[1];
        g_colors[3 * n + 2] += s[2];
        g_depths[g] += s[3];
        g_opac[n] += s[4];
        g_conics[3 * g] += s[5];
        g_conics[3 * g + 1] += s[6];
        g_conics[3 * g + 2] += s[7];
        g_means[2 * g] += s[8];
        g_means[2 * g + 1] += s[9];
    }
    return 0;
}

/* dims: N, cameras, width, height; params: near, far, eps2d; ptr: means, quats, scales, opacities, viewmats, Ks,
 * means2d, conics, depths, radii, valid and, for the backward, v_means2d, v_conics, v_depths, v_means, v_quats,
 * v_scales (every Gaussian's gradient is written whole, over all cameras in order: no accumulation across
 * threads). */
static void fill_proj(Proj *pj, const int64_t *dims, const double *params, const void *const *ptr) {
    memset(pj, 0, sizeof(*pj));
    pj->n = dims[0], pj->cams = dims[1], pj->width = (int32_t)dims[2], pj->height = (int32_t)dims[3];
    pj->near_plane = (float)params[0], pj->far_plane = (float)params[1], pj->eps2d = (float)params[2];
    pj->means = ptr[0], pj->quats = ptr[1], pj->scales = ptr[2], pj->opacities = ptr[3];
    pj->viewmats = ptr[4], pj->Ks = ptr[5];
    pj->means2d = (float *)ptr[6], pj->conics = (float *)ptr[7], pj->depths = (float *)ptr[8];
    pj->radii = (int32_t *)ptr[9], pj->valid = (uint8_t *)ptr[10];
    pj->chunk = 1024;
}

int lyra_project_forward(const int64_t *dims, const double *params, const void *const *ptr, int threads) {
    Proj pj;
    fill_proj(&pj, dims, params, ptr);
    return run_threads(&pj, project_worker, threads, NULL);
}

int lyra_project_backward(const int64_t *dims, const double *params, const void *const *ptr, int threads) {
    Proj pj;
    fill_proj(&pj, dims, params, ptr);
    pj.v_means2d = ptr[11], pj.v_conics = ptr[12], pj.v_depths = ptr[13];
    pj.v_means = (float *)ptr[14], pj.v_quats = (float *)ptr[15], pj.v_scales = (float *)ptr[16];
    return run_threads(&pj, project_worker, threads, NULL);
}

/* Fused block codes for compressed averaging (localsgd.engine.native_codec builds and loads this file).
 *
 * The same arithmetic as the torch path of localsgd/engine/compress.py, one value at a time, so the codes,
 * the scales and the decoded averages are the same bits (tested): each float operation below is one
 * IEEE-754 single-precision operation, rounded to nearest, in the order the torch path applies them,
 * compiled with -ffp-contract=off so that no multiply and add fuse into an FMA.
 *
 *   encode:  v = (ref - send) [+ e]               the pseudo-gradient, plus the error-feedback residual
 *            s = max|v| / qmax over each block     one float32 scale per block
 *            q = round_half_even(v / s)            clamped to +-qmax; int4 is packed two to a byte
 *            e = v - q * s                         what the code dropped (only with error feedback)
 *   land:    m = q_0 * (w s_0); m = m + q_r * (w s_r) for r = 1..K-1, in rank order; a = ref - m,
 *            then x_ref = a and the live parameters = a, or = live + (a - sent) (a delayed merge)
 *
 * One pass over the values per block instead of the torch path's ten (sub, add, abs, max, div, round,
 * clamp, multiply-add, cast, pack), and the scales go straight into the wire buffer beside the codes.
 * A block's intermediate values live in a block-sized scratch, so each pass reads and writes only what
 * must persist: the encode reads the live parameters and writes the code, the residual and the copy a
 * delayed merge needs; the landing reads the codes and writes x_ref and the live parameters.
 */
#include <stdint.h>
#include <string.h>

/* Round to nearest, ties to even (torch.round), for |x| < 2^22: the sum with 1.5 * 2^23 has no fraction
 * bits left, so the FPU rounds it in its default mode, and subtracting the constant back is exact. Without
 * -ffast-math (never passed) the compiler keeps both operations; the loops still vectorise. */
static inline float round_even(float x) {
    const float magic = 12582912.0f;
    float y = x + magic;
    return y - magic;
}

/* |v| as its bit pattern: for finite floats the order of these unsigned integers is the order of the
 * magnitudes, and an integer maximum vectorises where a float one (NaN and signed-zero rules) does not. */
static inline uint32_t abs_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7fffffffu;
}

static inline float nibble(const uint8_t *code, int64_t i) {
    return (float)((int32_t)((code[i >> 1] >> ((i & 1) * 4)) & 0x0F) - 8);
}

/* The block's grid values q (floats holding integers in [-8, 7]) as nibbles q + 8, low nibble first, at global
 * positions start .. start + w - 1. A block that starts at an odd position completes the byte whose low nibble
 * the previous block wrote; a block that ends on a low nibble writes a zero code (8) as its high one, which
 * the next block overwrites, or which stays as the pad after an odd count. */
static void pack4_block(uint8_t *codes, const float *restrict q, int64_t start, int64_t w) {
    int64_t i = 0;
    if (start & 1) {
        uint8_t *byte = codes + (start >> 1);
        *byte = (uint8_t)((*byte & 0x0F) | (((int32_t)q[0] + 8) << 4));
        i = 1;
    }
    uint8_t *restrict c = codes + ((start + i) >> 1);
    const int64_t pairs = (w - i) / 2;
    for (int64_t j = 0; j < pairs; ++j)
        c[j] = (uint8_t)(((int32_t)q[i + 2 * j] + 8) | (((int32_t)q[i + 2 * j + 1] + 8) << 4));
    if ((w - i) & 1) c[pairs] = (uint8_t)(((int32_t)q[w - 1] + 8) | (8 << 4));
}

/* x: the values sent, n floats (the live parameters, or a copy of them). copy_out: NULL, or n floats that
 * receive x (the copy a delayed merge needs, taken in this pass rather than in a gather pass before it).
 * codes: int8 values (pack4 == 0) or int4 nibbles two to a byte (low nibble first, q + 8); scales_out may be
 * unaligned (it sits right after the codes in the wire buffer), so it is written with memcpy. residual: NULL
 * (no error feedback) or n floats, read (added to v) and overwritten with what the code dropped. work: at least
 * min(block, n) floats of scratch for one block's values, so nothing the size of the fragment is written
 * besides the code, the residual and the copy. The values must be finite (the caller checks). Returns the
 * blocks. */
int64_t lsgd_encode(const float *restrict ref, const float *restrict x, float *restrict copy_out,
                    float *restrict residual, float *restrict work, uint8_t *restrict codes,
                    uint8_t *restrict scales_out, int64_t n, int64_t block, int32_t qmax, int32_t pack4) {
    const float fq = (float)qmax;
    int64_t nb = 0;
    for (int64_t start = 0; start < n; start += block, ++nb) {
        const int64_t w = start + block < n ? block : n - start;
        const float *restrict r = ref + start, *restrict xs = x + start;
        float *restrict v = work, *restrict e = residual ? residual + start : NULL;
        if (copy_out) memcpy(copy_out + start, xs, (size_t)w * sizeof(float));
        uint32_t top = 0;
        if (e) {
            for (int64_t i = 0; i < w; ++i) {
                v[i] = (r[i] - xs[i]) + e[i];
                uint32_t a = abs_bits(v[i]);
                top = a > top ? a : top;
            }
        } else {
            for (int64_t i = 0; i < w; ++i) {
                v[i] = r[i] - xs[i];
                uint32_t a = abs_bits(v[i]);
                top = a > top ? a : top;
            }
        }
        float amax;
        memcpy(&amax, &top, 4);
        const float s = amax / fq, safe = s > 0.0f ? s : 1.0f;
        memcpy(scales_out + 4 * nb, &s, 4);
        if (e) {
            for (int64_t i = 0; i < w; ++i) {
                float q = round_even(v[i] / safe);
                q = q > fq ? fq : (q < -fq ? -fq : q);
                e[i] = v[i] - q * s;
                v[i] = q;
            }
        } else {
            for (int64_t i = 0; i < w; ++i) {
                float q = round_even(v[i] / safe);
                v[i] = q > fq ? fq : (q < -fq ? -fq : q);
            }
        }
        if (!pack4) {
            int8_t *restrict c = (int8_t *)codes + start;
            for (int64_t i = 0; i < w; ++i) c[i] = (int8_t)(int32_t)v[i];
        } else {
            pack4_block(codes, v, start, w);
        }
    }
    return nb;
}

/* Land a fragment's average: per block, a = ref - sum_r q_r * (weight * s_r) (the sum in rank order), then
 *   out[j] = a       for out_from <= j < n, if out is not NULL (what the caller still needs as a tensor),
 *   ref[j] = a       if update_ref (the fragment's new global value x_ref),
 *   live[j] = a                          for j < n_live, if live is not NULL and sent is NULL, or
 *   live[j] = live[j] + (a - sent[j])    with sent: the average plus the progress made since the copy was sent.
 * wires: world buffers of wire_len bytes each, codes first, then the float32 scales (unaligned). work: at least
 * min(block, n) floats: one block's sum, so the average never makes a pass of its own over memory. */
void lsgd_land(float *restrict ref, const uint8_t *restrict wires, int64_t wire_len, int32_t world,
               float *restrict work, float *restrict out, int64_t out_from, int32_t update_ref,
               float *restrict live, const float *restrict sent, int64_t n_live, int64_t n, int64_t block,
               int32_t pack4, float weight, int32_t scale_weight) {
    const int64_t code_len = pack4 ? (n + 1) / 2 : n;
    int64_t nb = 0;
    for (int64_t start = 0; start < n; start += block, ++nb) {
        const int64_t w = start + block < n ? block : n - start;
        float *restrict m = work;
        for (int32_t r = 0; r < world; ++r) {
            const uint8_t *code = wires + (int64_t)r * wire_len;
            float s;
            memcpy(&s, code + code_len + 4 * nb, 4);
            if (scale_weight) s = s * weight;
            if (!pack4) {
                const int8_t *restrict c = (const int8_t *)code + start;
                if (r == 0)
                    for (int64_t i = 0; i < w; ++i) m[i] = (float)c[i] * s;
                else
                    for (int64_t i = 0; i < w; ++i) m[i] = m[i] + (float)c[i] * s;
            } else if ((start & 1) == 0 && (w & 1) == 0) { /* whole bytes: two values per byte */
                const uint8_t *restrict c = code + start / 2;
                if (r == 0)
                    for (int64_t j = 0; j < w / 2; ++j) {
                        m[2 * j] = (float)((int32_t)(c[j] & 0x0F) - 8) * s;
                        m[2 * j + 1] = (float)((int32_t)(c[j] >> 4) - 8) * s;
                    }
                else
                    for (int64_t j = 0; j < w / 2; ++j) {
                        m[2 * j] = m[2 * j] + (float)((int32_t)(c[j] & 0x0F) - 8) * s;
                        m[2 * j + 1] = m[2 * j + 1] + (float)((int32_t)(c[j] >> 4) - 8) * s;
                    }
            } else {
                for (int64_t i = 0; i < w; ++i) {
                    float t = nibble(code, start + i) * s;
                    m[i] = r == 0 ? t : m[i] + t;
                }
            }
        }
        float *restrict x = ref + start;
        for (int64_t i = 0; i < w; ++i) m[i] = x[i] - m[i];
        if (out) {
            const int64_t lo = out_from > start ? out_from - start : 0;
            if (lo < w) memcpy(out + start + lo, m + lo, (size_t)(w - lo) * sizeof(float));
        }
        if (update_ref) memcpy(x, m, (size_t)w * sizeof(float));
        if (live && start < n_live) {
            const int64_t k = start + w < n_live ? w : n_live - start;
            float *restrict y = live + start;
            if (sent) {
                const float *restrict z = sent + start;
                for (int64_t i = 0; i < k; ++i) {
                    float d = m[i] - z[i];
                    y[i] = y[i] + d;
                }
            } else {
                memcpy(y, m, (size_t)k * sizeof(float));
            }
        }
    }
}

/* Present so the loader can check it opened a library built from this very source. */
int32_t lsgd_codec_abi(void) { return 2; }

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
 *   decode:  m = q_0 * (w s_0); m = m + q_r * (w s_r) for r = 1..K-1, in rank order; out = ref - m
 *
 * One pass over the values per block instead of the torch path's ten (sub, add, abs, max, div, round,
 * clamp, multiply-add, cast, pack), and the scales go straight into the wire buffer beside the codes.
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

/* codes: int8 values (pack4 == 0) or int4 nibbles two to a byte (low nibble first, q + 8); scales_out may be
 * unaligned (it sits right after the codes in the wire buffer), so it is written with memcpy. residual: NULL
 * (no error feedback) or n floats, read (added to v) and overwritten with what the code dropped. work: n floats,
 * which end holding the rounded grid q. The values must be finite (the caller checks). Returns the blocks. */
int64_t lsgd_encode(const float *restrict ref, const float *restrict send, float *restrict residual,
                    float *restrict work, uint8_t *restrict codes, uint8_t *restrict scales_out, int64_t n,
                    int64_t block, int32_t qmax, int32_t pack4) {
    const float fq = (float)qmax;
    int64_t nb = 0;
    for (int64_t start = 0; start < n; start += block, ++nb) {
        const int64_t w = start + block < n ? block : n - start;
        const float *restrict r = ref + start, *restrict x = send + start;
        float *restrict v = work + start, *restrict e = residual ? residual + start : NULL;
        uint32_t top = 0;
        if (e) {
            for (int64_t i = 0; i < w; ++i) {
                v[i] = (r[i] - x[i]) + e[i];
                uint32_t a = abs_bits(v[i]);
                top = a > top ? a : top;
            }
        } else {
            for (int64_t i = 0; i < w; ++i) {
                v[i] = r[i] - x[i];
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
    }
    if (!pack4) {
        int8_t *restrict c = (int8_t *)codes;
        for (int64_t i = 0; i < n; ++i) c[i] = (int8_t)(int32_t)work[i];
    } else {
        const int64_t pairs = n / 2;
        for (int64_t j = 0; j < pairs; ++j)
            codes[j] = (uint8_t)(((int32_t)work[2 * j] + 8) | (((int32_t)work[2 * j + 1] + 8) << 4));
        if (n & 1) codes[pairs] = (uint8_t)(((int32_t)work[n - 1] + 8) | (8 << 4)); /* pad: a zero code */
    }
    return nb;
}

/* out = ref - sum_r q_r * (weight * s_r), the sum in rank order. wires: world buffers of wire_len bytes each,
 * codes first, then the float32 scales (unaligned). */
void lsgd_decode_mean(const float *restrict ref, const uint8_t *restrict wires, int64_t wire_len, int32_t world,
                      float *restrict out, int64_t n, int64_t block, int32_t pack4, float weight,
                      int32_t scale_weight) {
    const int64_t code_len = pack4 ? (n + 1) / 2 : n;
    int64_t nb = 0;
    for (int64_t start = 0; start < n; start += block, ++nb) {
        const int64_t w = start + block < n ? block : n - start;
        float *restrict m = out + start;
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
        const float *restrict x = ref + start;
        for (int64_t i = 0; i < w; ++i) m[i] = x[i] - m[i];
    }
}

/* Present so the loader can check it opened a library built from this very source. */
int32_t lsgd_codec_abi(void) { return 1; }

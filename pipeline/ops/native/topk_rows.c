/* The cache stage's hot loops on a CPU, fused, so that neither a block of attention probabilities nor a block of
 * scores is ever written to memory.
 *
 * `topk_map_qk`: from post-RoPE queries and keys to the top-m rows of every target map. Per tile of query rows of a
 * sample, the scores of every head against the keys the tile sees (a register-blocked product, `score_tile`: 12
 * query vectors x 32 keys per step, the keys in blocks that stay in the core's cache while every query vector of the
 * tile passes over them), then per query row (`map_row`), with n = the row's position + 1 visible keys:
 *   1. every teacher head's exp(s - max) over the visible keys and its sum (the 1/sum goes into the map weights);
 *   2. per target map s: the row c = sum_h w[b, s, h] p_h (only the heads with a non-zero weight);
 *   3. its m largest entries (`select_top`), descending, ties to the lower key; a row with n < m keys is padded with
 *      exact zeros at keys n..m-1, which it cannot see;
 *   4. per temperature tau the tail sum over the keys not kept, sum c^(1/tau), accumulated in double.
 * `topk_logit_block` / `topk_logit_finish`: the sparse logit targets of rows whose logits come a block of the
 * vocabulary at a time.
 * The same numbers as the torch forms (`pipeline.ops.topk_maps`, `pipeline.ops.kd`) up to fp32 rounding: both sum in
 * a different order. Built and loaded by `pipeline.ops.native`; compiled with -ffast-math (vector exp/log from
 * libmvec, reassociated sums) but linked without it, so the process's floating-point mode is left alone. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) && !defined(SHD_DISTILL_PORTABLE)
#include <immintrin.h>
#endif

static void sift_down(float *values, int64_t *keys, int64_t size, int64_t at) {
    for (;;) {
        int64_t left = 2 * at + 1, smallest = at;
        if (left < size && (values[left] < values[smallest] ||
                            (values[left] == values[smallest] && keys[left] > keys[smallest])))
            smallest = left;
        if (left + 1 < size && (values[left + 1] < values[smallest] ||
                                (values[left + 1] == values[smallest] && keys[left + 1] > keys[smallest])))
            smallest = left + 1;
        if (smallest == at)
            return;
        float value = values[at];
        int64_t key = keys[at];
        values[at] = values[smallest];
        keys[at] = keys[smallest];
        values[smallest] = value;
        keys[smallest] = key;
        at = smallest;
    }
}

/* values/keys[0..m) into a min-heap (root: the smallest; among equal values the larger key). */
static void heapify(float *values, int64_t *keys, int64_t m) {
    for (int64_t j = m / 2 - 1; j >= 0; j--)
        sift_down(values, keys, m, j);
}

/* A min-heap of m into descending order (ties: the lower key first). Popping the root, the smallest, fills the
 * arrays from the back. */
static void sort_heap(float *values, int64_t *keys, int64_t m) {
    for (int64_t size = m - 1; size > 0; size--) {
        float value = values[0];
        int64_t key = keys[0];
        values[0] = values[size];
        keys[0] = keys[size];
        values[size] = value;
        keys[size] = key;
        sift_down(values, keys, size, 0);
    }
}

/* The m largest of entries[0..n) (n >= m) into values/keys, descending; keys from `at` (NULL: the position). */
static void heap_top(const float *entries, const int64_t *at, int64_t n, int64_t m, float *values, int64_t *keys) {
    for (int64_t j = 0; j < m; j++) {
        values[j] = entries[j];
        keys[j] = at ? at[j] : j;
    }
    heapify(values, keys, m);
    for (int64_t k = m; k < n; k++) {
        int64_t key = at ? at[k] : k;
        if (entries[k] > values[0] || (entries[k] == values[0] && key < keys[0])) {
            values[0] = entries[k];
            keys[0] = key;
            sift_down(values, keys, m, 0);
        }
    }
    sort_heap(values, keys, m);
}

/* How many groups `select_top` cuts a row of n keys into for its m largest: a power of two of at least 2m and 16
 * (one vector), about sqrt(n m) / 2 (measured fastest on real attention rows at T 1024 and 8192: the groups' ranking
 * costs about G, the candidates' scan about m n / G), with two keys or more per group. 0: rank the row as it is. */
static int64_t group_count(int64_t n, int64_t m) {
    int64_t groups = 16;
    while (groups < 2 * m)
        groups *= 2;
    if (2 * groups > n)
        return 0;
    while (4 * groups * groups < n * m && 4 * groups <= n)
        groups *= 2;
    return groups;
}

/* The m-th largest of values[0..n) (n >= m), through a min-heap of the m largest seen (`heap`: m floats), filled
 * from the end of the array: attention rises towards a query's own key, so the largest come first and later values
 * rarely replace the root. */
static float mth_largest(const float *values, int64_t n, int64_t m, float *heap) {
    for (int64_t j = 0; j < m; j++)
        heap[j] = -FLT_MAX;
    for (int64_t i = n - 1; i >= 0; i--) {
        float value = values[i];
        if (i < n - m && value <= heap[0])
            continue;
        int64_t at = 0;
        for (;;) {
            int64_t child = 2 * at + 1;
            if (child >= m)
                break;
            if (child + 1 < m && heap[child + 1] < heap[child])
                child++;
            if (heap[child] >= value)
                break;
            heap[at] = heap[child];
            at = child;
        }
        heap[at] = value;
    }
    return heap[0];
}

/* The m largest of row[0..n) (n >= m), descending, ties to the lower key. A long row is cut into G groups, group g
 * = keys g, g + G, g + 2G, ... (so that the groups' maxima are taken with vector instructions, G at a time). The
 * m-th largest group maximum (the bar) is at most the m-th largest entry, so the m largest are among the entries
 * that reach the bar, and those lie in the groups whose maximum does (about m groups): only they are ranked. The row
 * must be writable up to the next multiple of G (padded with -FLT_MAX, below the bar of any row of real keys).
 * `scratch` holds n + 3G floats, `scratch_keys` n keys, G = group_count(n, m). */
static void select_top(float *row, int64_t n, int64_t m, float *values, int64_t *keys, float *scratch,
                       int64_t *scratch_keys) {
    int64_t groups = group_count(n, m);
    if (groups == 0) {
        heap_top(row, NULL, n, m, values, keys);
        return;
    }
    int64_t stripes = (n + groups - 1) / groups;
    for (int64_t k = n; k < stripes * groups; k++)
        row[k] = -FLT_MAX;
    float *peaks = scratch, *heap = scratch + groups, *candidates = scratch + 2 * groups;
    for (int64_t g = 0; g < groups; g++)
        peaks[g] = row[g];
    for (int64_t stripe = 1; stripe < stripes; stripe++) {
        const float *part = row + stripe * groups;
        for (int64_t g = 0; g < groups; g++)
            peaks[g] = part[g] > peaks[g] ? part[g] : peaks[g];
    }
    float bar = mth_largest(peaks, groups, m, heap);
    int64_t count = 0;
    for (int64_t g = 0; g < groups; g++) {
        if (peaks[g] < bar)
            continue;
        for (int64_t key = g; key < n; key += groups) {
            if (row[key] >= bar) {
                candidates[count] = row[key];
                scratch_keys[count++] = key;
            }
        }
    }
    if (count < m) /* only a NaN in the row compares false with everything: rank it as it is */
        heap_top(row, NULL, n, m, values, keys);
    else
        heap_top(candidates, scratch_keys, count, m, values, keys);
}

/* sum of row[0..n) in float within runs of 1024 (vectorised) and in double across them. */
static double chunked_sum(const float *row, int64_t n) {
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 1024) {
        int64_t stop = start + 1024 < n ? start + 1024 : n;
        float part = 0.0f;
        for (int64_t k = start; k < stop; k++)
            part += row[k];
        total += part;
    }
    return total;
}

/* sum of row[0..n)^exponent (row >= 0), summed as `chunked_sum` does. */
static double powered_sum(const float *row, int64_t n, float exponent) {
    if (exponent == 1.0f)
        return chunked_sum(row, n);
    double total = 0.0;
    for (int64_t start = 0; start < n; start += 1024) {
        int64_t stop = start + 1024 < n ? start + 1024 : n;
        float part = 0.0f;
        for (int64_t k = start; k < stop; k++)
            part += row[k] > 0.0f ? expf(exponent * logf(row[k])) : 0.0f;
        total += part;
    }
    return total;
}

#define QTILE 12 /* query vectors per step of `score_tile` */
#define KTILE 32  /* keys per step: two 16-float vectors */
#define KBLOCK 256 /* keys per pass of a tile's query vectors: 64 KB of a 64-wide key head, kept in L1/L2 */
#define TILE_ROWS 16 /* query rows per tile: every query vector of a KV head's tile reuses its key blocks */

/* Scores of `count` (<= QTILE) query vectors against keys [0, n) (n a multiple of KTILE) into out[q][0..n).
 * `queries` [dim][QTILE] (scaled, zero beyond `count`: one step's broadcasts are adjacent), `keys` [dim][stride]
 * (a KV head's keys, transposed). Each output is one sequential fused-multiply-add chain over dim. */
static void score_tile(const float *queries, int64_t count, const float *keys, int64_t stride, int64_t dim,
                       int64_t n, float *const *out) {
    for (int64_t start = 0; start < n; start += KTILE) {
#if defined(__AVX512F__) && !defined(SHD_DISTILL_PORTABLE)
        __m512 low[QTILE], high[QTILE];
#pragma GCC unroll 12
        for (int q = 0; q < QTILE; q++)
            low[q] = high[q] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dim; d++) {
            __m512 keys_low = _mm512_loadu_ps(keys + d * stride + start);
            __m512 keys_high = _mm512_loadu_ps(keys + d * stride + start + 16);
            const float *query = queries + d * QTILE;
#pragma GCC unroll 12
            for (int q = 0; q < QTILE; q++) {
                __m512 broadcast = _mm512_set1_ps(query[q]);
                low[q] = _mm512_fmadd_ps(broadcast, keys_low, low[q]);
                high[q] = _mm512_fmadd_ps(broadcast, keys_high, high[q]);
            }
        }
        for (int q = 0; q < count; q++) {
            _mm512_storeu_ps(out[q] + start, low[q]);
            _mm512_storeu_ps(out[q] + start + 16, high[q]);
        }
#else
        float sums[QTILE][KTILE] = {{0.0f}};
        for (int64_t d = 0; d < dim; d++) {
            const float *key = keys + d * stride + start;
            for (int q = 0; q < QTILE; q++)
                for (int j = 0; j < KTILE; j++)
                    sums[q][j] = fmaf(queries[d * QTILE + q], key[j], sums[q][j]);
        }
        for (int q = 0; q < count; q++)
            for (int j = 0; j < KTILE; j++)
                out[q][start + j] = sums[q][j];
#endif
    }
}

/* What one thread needs for `map_row` over rows of up to `width` keys; NULL members when an allocation failed. */
typedef struct {
    float *probs, *combined, *inverse, *scratch;
    int64_t *scratch_keys;
} RowScratch;

static RowScratch row_scratch(int64_t heads, int64_t width, int64_t m) {
    int64_t groups = group_count(width, m);
    RowScratch scratch = {
        .probs = malloc(sizeof(float) * (size_t)(heads * width)),
        .combined = malloc(sizeof(float) * (size_t)(width + groups)),
        .inverse = malloc(sizeof(float) * (size_t)heads),
        .scratch = malloc(sizeof(float) * (size_t)(width + 3 * groups)),
        .scratch_keys = malloc(sizeof(int64_t) * (size_t)(width + groups)),
    };
    return scratch;
}

static int row_scratch_ok(RowScratch scratch) {
    return scratch.probs && scratch.combined && scratch.inverse && scratch.scratch && scratch.scratch_keys;
}

static void free_row_scratch(RowScratch scratch) {
    free(scratch.probs);
    free(scratch.combined);
    free(scratch.inverse);
    free(scratch.scratch);
    free(scratch.scratch_keys);
}

/* Steps 1-4 of one query row: `scores` holds head h's scores at scores + h * head_stride, keys 0..n-1 visible.
 * weights [S, H] of its sample; writes value/key [S][map_stride] (m each, from `values`/`keys`) and the tails. */
static void map_row(const float *scores, int64_t head_stride, int64_t n, int64_t heads, int64_t width,
                    const float *weights, int64_t maps, int64_t m, const float *exponents, int64_t temperatures,
                    float *values, int64_t *keys, float *tails, int64_t map_stride, RowScratch work) {
    float *combined = work.combined;
    for (int64_t h = 0; h < heads; h++) {
        const float *row = scores + h * head_stride;
        float *prob = work.probs + h * width;
        float most = row[0];
        for (int64_t k = 1; k < n; k++)
            most = row[k] > most ? row[k] : most;
        float total = 0.0f;
        for (int64_t k = 0; k < n; k++) {
            prob[k] = expf(row[k] - most);
            total += prob[k];
        }
        work.inverse[h] = 1.0f / total;
    }
    for (int64_t s = 0; s < maps; s++) {
        const float *weight = weights + s * heads;
        float *value = values + s * map_stride * m;
        int64_t *key = keys + s * map_stride * m;
        int first = 1;
        for (int64_t h = 0; h < heads; h++) {
            if (weight[h] == 0.0f)
                continue;
            const float *prob = work.probs + h * width;
            float w = weight[h] * work.inverse[h];
            if (first) {
                for (int64_t k = 0; k < n; k++)
                    combined[k] = w * prob[k];
                first = 0;
            } else {
                for (int64_t k = 0; k < n; k++)
                    combined[k] += w * prob[k];
            }
        }
        if (first)
            for (int64_t k = 0; k < n; k++)
                combined[k] = 0.0f;
        int64_t kept = n < m ? n : m;
        select_top(combined, n, kept, value, key, work.scratch, work.scratch_keys);
        for (int64_t j = kept; j < m; j++) {
            value[j] = 0.0f;
            key[j] = j;
        }
        for (int64_t j = 0; j < kept; j++)
            combined[key[j]] = 0.0f;
        for (int64_t t = 0; t < temperatures; t++)
            tails[s * map_stride * temperatures + t] = (float)powered_sum(combined, n, exponents[t]);
    }
}

/* query [B, H, T, D] (post-RoPE), keys_t [B, H_kv, D, P] (the keys transposed, P >= T a multiple of KTILE, zero
 * beyond T; query head h reads KV head h / (H / H_kv)), positions [B, R] (sorted: row r sees keys 0..positions[r]),
 * weights [B, S, H]; exponents [NT] = 1 / tau. Writes values [B, S, R, M] (probabilities), keys [B, S, R, M], tails
 * [B, S, R, NT]. Returns 0, or 1 when a thread's scratch could not be allocated. */
int topk_map_qk(const float *query, const float *keys_t, float scale, const int64_t *positions, const float *weights,
                int64_t batch, int64_t heads, int64_t key_heads, int64_t dim, int64_t seq_len, int64_t padded,
                int64_t rows, int64_t maps, int64_t m, const float *exponents, int64_t temperatures, float *values,
                int64_t *keys, float *tails, int threads) {
    int failed = 0;
    int64_t per_key_head = heads / key_heads, tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    int64_t chunks = (per_key_head * TILE_ROWS + QTILE - 1) / QTILE;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tile = malloc(sizeof(float) * (size_t)(heads * TILE_ROWS * padded));
        float *queries = malloc(sizeof(float) * (size_t)(chunks * QTILE * dim));
        float **outputs = malloc(sizeof(float *) * (size_t)(chunks * QTILE));
        RowScratch work = row_scratch(heads, padded, m);
        int ok = tile != NULL && queries != NULL && outputs != NULL && row_scratch_ok(work);
        failed |= !ok;
        /* Every thread takes part in the loop (a thread that skipped it would leave the others at its barrier); one
         * without scratch skips its rows and the call reports the failure. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * tiles; item++) {
            if (!ok)
                continue;
            int64_t b = item / tiles, first_row = item % tiles * TILE_ROWS;
            int64_t count = rows - first_row < TILE_ROWS ? rows - first_row : TILE_ROWS;
            const int64_t *position = positions + b * rows + first_row;
            int64_t width = (position[count - 1] + KTILE) / KTILE * KTILE;
            /* vector v of KV head g: query head g * per_key_head + v / count at row v % count -> its tile row */
            int64_t vectors = per_key_head * count;
            for (int64_t g = 0; g < key_heads; g++) {
                for (int64_t v = 0; v < chunks * QTILE; v++) {
                    float *slot = queries + (v / QTILE) * QTILE * dim + v % QTILE;
                    if (v >= vectors) {
                        for (int64_t d = 0; d < dim; d++)
                            slot[d * QTILE] = 0.0f;
                        continue;
                    }
                    int64_t h = g * per_key_head + v / count, r = v % count;
                    const float *source = query + ((b * heads + h) * seq_len + position[r]) * dim;
                    for (int64_t d = 0; d < dim; d++)
                        slot[d * QTILE] = source[d] * scale;
                    outputs[v] = tile + (h * TILE_ROWS + r) * padded;
                }
                const float *key = keys_t + (b * key_heads + g) * dim * padded;
                for (int64_t start = 0; start < width; start += KBLOCK) {
                    int64_t span = width - start < KBLOCK ? width - start : KBLOCK;
                    for (int64_t c = 0; c * QTILE < vectors; c++) {
                        int64_t filled = vectors - c * QTILE < QTILE ? vectors - c * QTILE : QTILE;
                        float *out[QTILE];
                        for (int64_t q = 0; q < filled; q++)
                            out[q] = outputs[c * QTILE + q] + start;
                        score_tile(queries + c * QTILE * dim, filled, key + start, padded, dim, span, out);
                    }
                }
            }
            for (int64_t r = 0; r < count; r++) {
                int64_t at = b * maps * rows + first_row + r;
                map_row(tile + r * padded, TILE_ROWS * padded, position[r] + 1, heads, padded, weights + b * maps * heads,
                        maps, m, exponents, temperatures, values + at * m, keys + at * m, tails + at * temperatures, rows,
                        work);
            }
        }
        free(tile);
        free(queries);
        free(outputs);
        free_row_scratch(work);
    }
    return failed;
}

/* The sparse logit targets (`pipeline.ops.kd.topk_targets`) of rows whose logits arrive a block of the vocabulary
 * at a time, in token order, so that the output layer's product can be taken in blocks that stay in the cache and
 * the [R, V] logits are never written out. Per row the stream keeps: the running maximum m (of the logits clamped to
 * >= -FLT_MAX, so exp's underflow never decides the ranking), Z = sum exp(z - m) over every token seen, per
 * temperature tau the tail sum sum exp((z - m) / tau) over the tokens seen and not kept, and a min-heap of the k
 * largest (root: the smallest; among equal values the later token, which the final order puts last). When m rises
 * the sums are rescaled. Every token's term is added to a tail once: when it is turned away, or when it is evicted
 * from the heap (so no tail is a difference, and a tail of 1e-17 keeps its digits). State per row: `heap_values`/
 * `heap_keys` [k], `maxima` [1] (start: -FLT_MAX), `sums` [1 + NT] (start: 0). */
typedef struct {
    float *values;
    int64_t *keys;
    float *maximum;
    double *sums;
} LogitStream;

/* Adds the terms of an entry that is turned away or evicted, relative to the running maximum, to every tail. */
static void add_to_tails(LogitStream state, float value, float most, const float *exponents, int64_t temperatures) {
    for (int64_t t = 0; t < temperatures; t++)
        state.sums[1 + t] += exp(((double)value - most) * exponents[t]);
}

/* A logit as the ranking sees it: -inf (and NaN) as -FLT_MAX. */
static inline float ranked(float logit) { return logit > -FLT_MAX ? logit : -FLT_MAX; }

#define HIT_RUN 64 /* entries per flag of `stream_row`'s candidate scan */

/* One row's block of logits z[0..width), tokens start..start+width-1. Scratch: `peaks` G floats, `heap` k floats,
 * `hits` width / HIT_RUN + 1 floats, G = group_count(width, k). An entry is turned away at once when it is not above
 * the heap's smallest (a later token loses a tie) or, before the heap is full, below a bar: the k-th largest group
 * maximum of the block (as in `select_top`), under which k entries of the block are larger. The others, the
 * candidates (rare once the heap is full), are found by runs of HIT_RUN entries flagged in the vectorised pass. */
static void stream_row(const float *z, int64_t width, int64_t start, int64_t k, const float *exponents,
                       int64_t temperatures, LogitStream state, float *peaks, float *heap, float *hits) {
    int64_t size = start < k ? start : k;
    float block_max = -FLT_MAX;
    for (int64_t j = 0; j < width; j++)
        block_max = ranked(z[j]) > block_max ? ranked(z[j]) : block_max;
    float most = *state.maximum;
    if (block_max > most) {
        double shift = (double)most - block_max;
        state.sums[0] *= exp(shift);
        for (int64_t t = 0; t < temperatures; t++)
            state.sums[1 + t] *= exp(shift * exponents[t]);
        most = *state.maximum = block_max;
    }
    int full = size == k;
    float bar = -FLT_MAX, floor = full ? state.values[0] : -FLT_MAX;
    int64_t groups = full ? 0 : group_count(width, k);
    if (groups > 0) {
        for (int64_t g = 0; g < groups; g++)
            peaks[g] = -FLT_MAX;
        for (int64_t begin = 0; begin < width; begin += groups) {
            int64_t count = width - begin < groups ? width - begin : groups;
            for (int64_t g = 0; g < count; g++)
                peaks[g] = ranked(z[begin + g]) > peaks[g] ? ranked(z[begin + g]) : peaks[g];
        }
        bar = mth_largest(peaks, groups, k, heap);
    }
    /* Z over every entry; the tails over those turned away at once. The candidates' terms go to the tails below
     * unless they stay in the heap. */
    double total = 0.0, unit_tail = 0.0;
    for (int64_t begin = 0; begin < width; begin += 1024) {
        int64_t stop = begin + 1024 < width ? begin + 1024 : width;
        float part = 0.0f, away = 0.0f;
        for (int64_t run = begin; run < stop; run += HIT_RUN) {
            int64_t end = run + HIT_RUN < stop ? run + HIT_RUN : stop;
            float kept = 0.0f;
            for (int64_t j = run; j < end; j++) {
                float term = expf(z[j] - most);
                int turned = ranked(z[j]) < bar || (full && ranked(z[j]) <= floor);
                part += term;
                away += turned ? term : 0.0f;
                kept += turned ? 0.0f : 1.0f;
            }
            hits[run / HIT_RUN] = kept;
        }
        total += part;
        unit_tail += away;
    }
    state.sums[0] += total;
    for (int64_t t = 0; t < temperatures; t++) {
        if (exponents[t] == 1.0f) {
            state.sums[1 + t] += unit_tail;
            continue;
        }
        double tail = 0.0;
        for (int64_t begin = 0; begin < width; begin += 1024) {
            int64_t stop = begin + 1024 < width ? begin + 1024 : width;
            float away = 0.0f;
            for (int64_t j = begin; j < stop; j++) {
                float term = expf((z[j] - most) * exponents[t]);
                away += ranked(z[j]) < bar || (full && ranked(z[j]) <= floor) ? term : 0.0f;
            }
            tail += away;
        }
        state.sums[1 + t] += tail;
    }
    for (int64_t run = 0; run < width; run += HIT_RUN) {
        if (hits[run / HIT_RUN] == 0.0f)
            continue;
        int64_t end = run + HIT_RUN < width ? run + HIT_RUN : width;
        for (int64_t j = run; j < end; j++) {
            float value = ranked(z[j]);
            if (value < bar || (full && value <= floor))
                continue;
            if (size < k) {
                state.values[size] = value;
                state.keys[size++] = start + j;
                if (size == k)
                    heapify(state.values, state.keys, k);
            } else if (value > state.values[0]) {
                add_to_tails(state, state.values[0], most, exponents, temperatures);
                state.values[0] = value;
                state.keys[0] = start + j;
                sift_down(state.values, state.keys, k, 0);
            } else {
                add_to_tails(state, value, most, exponents, temperatures);
            }
        }
    }
}

static LogitStream stream_of(float *heap_values, int64_t *heap_keys, float *maxima, double *sums, int64_t row,
                             int64_t k, int64_t temperatures) {
    LogitStream state = {heap_values + row * k, heap_keys + row * k, maxima + row, sums + row * (1 + temperatures)};
    return state;
}

/* `stream_row` on rows of a block: logits [R, W] of tokens start..start+W-1, the state of R rows (k <= start + W).
 * Returns 0, or 1 when a thread's scratch could not be allocated. */
int topk_logit_block(const float *logits, int64_t rows, int64_t width, int64_t start, int64_t k,
                     const float *exponents, int64_t temperatures, float *heap_values, int64_t *heap_keys,
                     float *maxima, double *sums, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t groups = group_count(width, k), runs = width / HIT_RUN + 1;
        float *scratch = malloc(sizeof(float) * (size_t)(groups + k + runs));
        int ok = scratch != NULL;
        failed |= !ok;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < rows; r++) {
            if (!ok)
                continue;
            LogitStream state = stream_of(heap_values, heap_keys, maxima, sums, r, k, temperatures);
            stream_row(logits + r * width, width, start, k, exponents, temperatures, state, scratch, scratch + groups,
                       scratch + groups + k);
        }
        free(scratch);
    }
    return failed;
}

/* The end of the stream of R rows: log-probabilities of the k largest logits [R, k] (descending, ties to the lower
 * token), their tokens [R, k], per temperature tau the tail sum over the other tokens, sum p^(1/tau), [R, NT]. */
void topk_logit_finish(int64_t rows, int64_t k, const float *exponents, int64_t temperatures, float *heap_values,
                       int64_t *heap_keys, const float *maxima, const double *sums, float *values, int64_t *keys,
                       float *tails, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *heap = heap_values + r * k;
        int64_t *heap_key = heap_keys + r * k;
        sort_heap(heap, heap_key, k);
        const double *sum = sums + r * (1 + temperatures);
        double log_total = log(sum[0]);
        for (int64_t j = 0; j < k; j++) {
            values[r * k + j] = heap[j] > -FLT_MAX ? (heap[j] - maxima[r]) - (float)log_total : -INFINITY;
            keys[r * k + j] = heap_key[j];
        }
        for (int64_t t = 0; t < temperatures; t++)
            tails[r * temperatures + t] = (float)(sum[1 + t] * exp(-log_total * exponents[t]));
    }
}

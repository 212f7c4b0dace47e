// CPU kernel of the GSPN scan. See gspn_scan_kernel.h and SPEC.md section 2.
//
// Memory order. Tensors are row-major NCHW. A row scan (t2b, b2t) walks lines that are contiguous
// rows, so each line update is a contiguous, vectorizable loop over the W positions, reading the
// previous line from the output itself (float32) or from a float32 line buffer (float16); the
// fused float32 scan of a small plane with short rows runs the plane as one range instead
// (RowScanFusedPlane: per-line loops of 7 or 14 positions cost more than the arithmetic).
// A column scan (l2r, r2l) walks columns, which are strided in memory. It is processed in strips
// of adjacent columns (the whole plane for small maps, else L1-sized strips; see
// MakeColumnLayout): the strip is transposed into zero-padded float32 lines in scratch with 8x8
// register transposes (masked at the plane's edges), scanned line by line (lines of up to 64
// positions with the previous line held in registers, longer ones with a vectorized line update
// that reads it back), and transposed back; rows a little ahead are prefetched (see
// PrefetchBytes: until 2026-11-28 GCC had deleted every prefetch of this file). Only the last line
// of a strip is carried to the next one. Scratch is the caller's (see ScratchFloats).
#include "gspn_scan_kernel.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace gspn {

bool ParseDirection(const char* name, size_t length, Direction* direction) {
  if (name == nullptr || length != 3) return false;
  const auto is = [&](const char* candidate) { return std::memcmp(name, candidate, 3) == 0; };
  if (is("t2b")) { *direction = Direction::kTopToBottom; return true; }
  if (is("b2t")) { *direction = Direction::kBottomToTop; return true; }
  if (is("l2r")) { *direction = Direction::kLeftToRight; return true; }
  if (is("r2l")) { *direction = Direction::kRightToLeft; return true; }
  return false;
}

namespace {

constexpr int64_t kTile = 8;           // the 8x8 register transposes
// Strips of tall planes, whose five blocks exceed the L1 even at two tiles' width: 256 bytes of
// each float32 row (4 cache lines). A 1024-wide plane's rows are 4 KiB apart, so the one line per
// row of a 16-column strip falls in the same L1 set for every row and in another page, and its
// reads stayed latency-bound whatever was prefetched. 2-core EPYC, ms, 16 columns -> 64 (prefetches
// on): (2, 8, 1024, 1024) l2r 32.1 -> 20.4, fused 49.0 -> 37.8; 32 columns 26.6-35.5, 128 the same
// as 64; at 256x256 and 512x512 within noise of 16 columns. The blocks (1.3 MiB at H = 1024) live
// in the L2 and L3.
constexpr int64_t kWideStripLines = 64;
constexpr int64_t kGuard = 8;           // zero floats around each line of h (see ColumnLayout)
constexpr int64_t kCacheLine = 16;      // floats
constexpr int64_t kMaxShortLine = 64;   // longest line scanned in registers (ScanShortLines)
constexpr float kNormalizationFloor = 1e-7f;  // t = max(s_l + s_m + s_r, 1e-7): SPEC section 3
// Strips are sized so that their five transposed blocks stay in a core's L1 data cache (32 KiB
// and more on the AVX2 machines this targets) next to the rows being read.
constexpr int64_t kStripCacheBytes = int64_t{32} << 10;

inline int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Requests the cache lines of [begin, begin + bytes) into every cache level, for reading or
// (kForWrite) for writing. The empty volatile asm is what keeps the prefetches: GCC counts
// __builtin_prefetch as no side effect, so its IPA analysis found the helpers that only prefetch
// `const` and deleted every call to them (GCC 12: not one prefetch instruction was left in this
// file's object code until this was noticed; the prefetching described below had never run).
// kLocality 3 (prefetcht0) fetches into every level, 2 (prefetcht1) leaves the L1 out.
template <bool kForWrite, int kLocality = 3>
inline void PrefetchBytes(const void* begin, int64_t bytes) {
  constexpr int64_t kLine = 64;
  const char* first = static_cast<const char*>(begin);
  for (int64_t b = 0; b < bytes; b += kLine) __builtin_prefetch(first + b, kForWrite, kLocality);
  __builtin_prefetch(first + bytes - 1, kForWrite, kLocality);
  asm volatile("");
}

// Scratch of a column scan: five transposed blocks (lam x, gl, gm, gr, h) of `strip` lines, then
// the line carried from one strip to the next. Line t of a block starts at
// kGuard + t * line_stride: H floats, zero padding to `padded` = RoundUp(H, 8) (so that the line
// update and the tile transposes work on whole 8-float vectors), and a gap to the next line that
// holds at least kGuard floats, kept zero in the h block and the carry: the out-of-line
// neighbours prev[-1] and prev[H] of the line update. The line stride is padded by a cache line
// more where it would be a multiple of 512 bytes: the eight lines a tile transpose writes would
// otherwise share one or few L1 sets (4 KiB per way) with the eight rows it reads, which share a
// set when W is a power of two (unpadded, 1024-high strips of 32 columns ran 1.9x slower).
// Blocks are one cache line more than their lines apart, so that the same position of the five
// blocks does not share an address modulo 4 KiB (the line update's loads would wait on its
// store).
// lam x is transposed as one product (both are only ever used multiplied): one transpose and
// one block fewer than x and lam apart.
constexpr int64_t kColumnBlocks = 5;
struct ColumnLayout {
  int64_t strip;
  int64_t padded;
  int64_t line_stride;
  int64_t block;
  int64_t carry;  // floats of the carried line, guards included
};

// Strip width: the whole plane when its five blocks fit kStripCacheBytes (maps up to 28x28 and
// tall narrow ones), else the widest strips of whole tiles that fit (at least 16 columns: a whole
// cache line of each float32 row), or for planes too tall for even that kWideStripLines columns,
// evened out over the plane. The five blocks never take more than kMaxStripScratchBytes
// unless a single column needs more (H > ~349000): strips narrow below 128 columns for H > ~3200,
// below 16 for H > ~26000.
// `planes` planes scanned together (see BatchPlanes) lay their columns end to end in each line:
// plane p at positions [p H, p H + H); its transposes write whole tiles from p H, hence the line
// stride covers (planes - 1) H + RoundUp(H, 8).
ColumnLayout MakeColumnLayout(const ScanGeometry& g, int64_t planes) {
  const int64_t padded = RoundUp(planes * g.height, kTile);
  const int64_t written = (planes - 1) * g.height + RoundUp(g.height, kTile);
  int64_t line_stride = std::max(padded, written) + kGuard;
  if (line_stride % (8 * kCacheLine) == 0) line_stride += kCacheLine;
  const int64_t block_extra = kGuard + kCacheLine;
  const int64_t line_bytes = kColumnBlocks * line_stride * static_cast<int64_t>(sizeof(float));
  const int64_t extra_bytes = kColumnBlocks * block_extra * static_cast<int64_t>(sizeof(float));
  const int64_t fitting = (static_cast<int64_t>(kMaxStripScratchBytes) - extra_bytes) / line_bytes;
  int64_t strip = kStripCacheBytes / line_bytes / kTile * kTile;
  if (strip < 2 * kTile) strip = kWideStripLines;
  if (strip < g.width) {
    const int64_t strips = (g.width + strip - 1) / strip;
    strip = RoundUp((g.width + strips - 1) / strips, kTile);
  }
  strip = std::max<int64_t>(1, std::min({strip, fitting, g.width}));
  return {strip, padded, line_stride, kGuard + strip * line_stride + block_extra,
          padded + 2 * kGuard};
}

bool IsRowScan(Direction direction);

// Planes of a column scan scanned together, their columns end to end in one line: as many as
// fit a short line (kMaxShortLine positions, scanned in registers), up to kMaxBatchPlanes. Small
// planes (GSPN-T scans thousands of 7x7 to 28x28 planes) would otherwise pay a strip's fixed
// costs and a line update's latency for a few positions each. Only where the short-line scan
// exists (AVX2); 1 for row scans and tall planes.
constexpr int64_t kMaxBatchPlanes = 16;
int64_t BatchPlanes(const ScanGeometry& g) {
#if defined(__AVX2__)
  if (!IsRowScan(g.direction) && 2 * g.height <= kMaxShortLine) {
    return std::min({kMaxShortLine / g.height, kMaxBatchPlanes, g.batch * g.channels});
  }
#endif
  (void)g;
  return 1;
}

bool IsRowScan(Direction direction) {
  return direction == Direction::kTopToBottom || direction == Direction::kBottomToTop;
}

// ---- float16 <-> float32 -------------------------------------------------------------------

#if defined(__F16C__)
inline float HalfToFloat(Half value) { return _cvtsh_ss(value.bits); }
inline Half FloatToHalf(float value) {
  return Half{static_cast<uint16_t>(_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT))};
}
#else
inline float HalfToFloat(Half value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  uint32_t exponent = (value.bits >> 10) & 0x1Fu;
  uint32_t mantissa = value.bits & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

inline Half FloatToHalf(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) {  // inf or nan
    return Half{static_cast<uint16_t>(sign | 0x7C00u | (abs_bits > 0x7F800000u ? 0x200u : 0u))};
  }
  if (abs_bits >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // overflow
  if (abs_bits < 0x38800000u) {  // result is subnormal or zero
    if (abs_bits < 0x33000000u) return Half{sign};
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t mantissa = (abs_bits & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;
    uint32_t half_mantissa = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return Half{static_cast<uint16_t>(sign | half_mantissa)};
  }
  uint32_t rounded = abs_bits + 0xFFFu + ((abs_bits >> 13) & 1u);  // round to nearest even
  rounded -= 0x38000000u;                                          // rebias exponent 127 -> 15
  return Half{static_cast<uint16_t>(sign | (rounded >> 13))};
}
#endif

inline float ToFloat(float value) { return value; }
inline float ToFloat(Half value) { return HalfToFloat(value); }
template <typename T>
inline T FromFloat(float value);
template <>
inline float FromFloat<float>(float value) { return value; }
template <>
inline Half FromFloat<Half>(float value) { return FloatToHalf(value); }

void HalfLineToFloat(const Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(packed));
  }
#endif
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

void FloatLineToHalf(const float* __restrict__ src, Half* __restrict__ dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i packed = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
#endif
  for (; i < n; ++i) dst[i] = FloatToHalf(src[i]);
}

// ---- the fused scan's weights and output -----------------------------------------------------

// Elementwise loops over lines that may be updated in place (no __restrict__ possible): each
// position is read before it is written and no other position is touched, so the compiler may
// vectorize them as if the pointers did not alias.
#if defined(__clang__)
#define GSPN_ELEMENTWISE_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define GSPN_ELEMENTWISE_LOOP _Pragma("GCC ivdep")
#else
#define GSPN_ELEMENTWISE_LOOP
#endif

// The weight computation selects with comparisons (clamp, sign, floor). GCC's default
// -ftrapping-math keeps a comparison that may raise an FP exception from being executed for every
// lane, which blocks vectorizing these loops without AVX-512 masks (4x slower at x86-64-v3); the
// library never reads FP exception flags. Clang does not trap by default.
#if defined(__GNUC__) && !defined(__clang__)
#define GSPN_NO_TRAPPING_MATH __attribute__((optimize("no-trapping-math")))
#else
#define GSPN_NO_TRAPPING_MATH
#endif

// exp(x) for x <= 0, to about 2 ulp (Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-7
// polynomial of r, 2^n from the exponent bits). Branch-free so that the line loops vectorize;
// clamped at -87 (exp(-87) is about 1.6e-38, the smallest normal power kept); NaN stays NaN.
GSPN_NO_TRAPPING_MATH inline float ExpNonPositive(float x) {
  constexpr float kLowest = -87.0f, kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < kLowest ? kLowest : x;
  const float shifted = x * kLog2e + kRound;
  const float n = shifted - kRound;
  const uint32_t scale_bits =
      (__builtin_bit_cast(uint32_t, shifted) - __builtin_bit_cast(uint32_t, kRound) + 127u) << 23;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * __builtin_bit_cast(float, scale_bits);
}

// sigmoid(a) = num / den with e = exp(-|a|) <= 1: (1, 1 + e) for a >= 0, (e, 1 + e) below (no
// cancellation, and den in [1, 2]).
GSPN_NO_TRAPPING_MATH inline void SigmoidFraction(float a, float* num, float* den) {
  const float e = ExpNonPositive(a < 0.0f ? a : -a);
  *num = a >= 0.0f ? 1.0f : e;
  *den = 1.0f + e;
}

// Which neighbours position p of a range has, for NormalizeWith: a line's positions
// [first, first + count) of `length` ...
struct LineEdges {
  int64_t first, length;
  GSPN_NO_TRAPPING_MATH bool Left(int64_t p) const { return first + p > 0; }
  GSPN_NO_TRAPPING_MATH bool Right(int64_t p) const { return first + p < length - 1; }
};
// ... or whole rows of a plane, from precomputed 0/1 masks (see RowEdgeMasks).
struct MaskEdges {
  const float* left;
  const float* right;
  GSPN_NO_TRAPPING_MATH bool Left(int64_t p) const { return left[p] != 0.0f; }
  GSPN_NO_TRAPPING_MATH bool Right(int64_t p) const { return right[p] != 0.0f; }
};

// The normalized weights of positions [0, count) from the logits at al[0, count) ... into
// gl[0, count) ...: s_k = sigmoid(a_k), s_l = 0 at a line's first position, s_r = 0 at its last
// (`edges`), t = max(s_l + s_m + s_r, 1e-7), g_k = s_k / t. Over a common denominator (den_l
// den_m den_r in [1, 8]) so that a position costs one division. In place allowed (gl == al, ...).
template <typename Edges>
GSPN_NO_TRAPPING_MATH void NormalizeWith(const float* al, const float* am, const float* ar,
                                         float* gl, float* gm, float* gr, int64_t count,
                                         Edges edges) {
  GSPN_ELEMENTWISE_LOOP
  for (int64_t p = 0; p < count; ++p) {
    const bool has_left = edges.Left(p), has_right = edges.Right(p);
    const float left_mask = has_left ? 1.0f : 0.0f;
    const float right_mask = has_right ? 1.0f : 0.0f;
    // A logit outside the line is selected away: NaN there must not reach the common denominator.
    // Read unconditionally (p < count is in the row): a conditional read compiles to a masked
    // load, which stalled on every cache miss (b2t, whose rows the hardware does not prefetch).
    const float logit_l = al[p], logit_r = ar[p];
    float num_l, den_l, num_m, den_m, num_r, den_r;
    SigmoidFraction(has_left ? logit_l : 0.0f, &num_l, &den_l);
    SigmoidFraction(am[p], &num_m, &den_m);
    SigmoidFraction(has_right ? logit_r : 0.0f, &num_r, &den_r);
    const float wl = num_l * left_mask * (den_m * den_r);
    const float wm = num_m * (den_l * den_r);
    const float wr = num_r * right_mask * (den_l * den_m);
    const float sum = (wl + wm) + wr;
    const float floor = kNormalizationFloor * (den_l * den_m * den_r);
    const float inverse = 1.0f / (sum < floor ? floor : sum);  // NaN stays NaN
    gl[p] = wl * inverse;
    gm[p] = wm * inverse;
    gr[p] = wr * inverse;
  }
}

// Positions [first, first + count) of a line of `length` positions (see NormalizeWith).
void NormalizeRange(const float* al, const float* am, const float* ar, float* gl, float* gm,
                    float* gr, int64_t first, int64_t count, int64_t length) {
  NormalizeWith(al, am, ar, gl, gm, gr, count, LineEdges{first, length});
}

// The weights of a whole line (see NormalizeRange). A line of whole vectors is one range;
// otherwise the positions past the last multiple of kNormalizeBlock go through a zero-padded
// block, so that no position is computed by the compiler's scalar remainder loop (a line of 56
// spent most of its time there, and 56 = 3 x 16 + 8 still did through the block: 576x56² fused
// t2b 1.92 -> 1.55 ms as one range; lines of 14 or 28 are faster as 16-blocks than as 8-blocks).
constexpr int64_t kNormalizeBlock = 16;
constexpr int64_t kNormalizeVector = 8;
void NormalizeLine(const float* al, const float* am, const float* ar, float* gl, float* gm,
                   float* gr, int64_t length) {
  const int64_t whole =
      length % kNormalizeVector == 0 ? length : length / kNormalizeBlock * kNormalizeBlock;
  NormalizeRange(al, am, ar, gl, gm, gr, 0, whole, length);
  const int64_t rest = length - whole;
  if (rest == 0) return;
  float block[3][kNormalizeBlock] = {};
  const float* logits[3] = {al + whole, am + whole, ar + whole};
  float* weights[3] = {gl + whole, gm + whole, gr + whole};
  for (int k = 0; k < 3; ++k) std::copy(logits[k], logits[k] + rest, block[k]);
  NormalizeRange(block[0], block[1], block[2], block[0], block[1], block[2], whole,
                 kNormalizeBlock, length);
  for (int k = 0; k < 3; ++k) std::copy(block[k], block[k] + rest, weights[k]);
}

// y[p] = h[p] gate[p] + u[p] skip[p].
inline void GateSkipLine(const float* __restrict__ h, const float* __restrict__ u,
                         const float* __restrict__ gate, const float* __restrict__ skip,
                         float* __restrict__ y, int64_t n) {
  for (int64_t p = 0; p < n; ++p) y[p] = h[p] * gate[p] + u[p] * skip[p];
}

// ---- one line of the recurrence --------------------------------------------------------------

// out[p] = lam[p] * x[p]: the first line of a segment.
inline void StartLine(const float* __restrict__ x, const float* __restrict__ lam,
                      float* __restrict__ out, int64_t length) {
  for (int64_t p = 0; p < length; ++p) out[p] = lam[p] * x[p];
}

// out[p] = lam[p] x[p] + gl[p] prev[p-1] + gm[p] prev[p] + gr[p] prev[p+1], with out-of-line
// neighbours contributing zero whatever their weight holds.
inline void PropagateLine(const float* __restrict__ x, const float* __restrict__ lam,
                          const float* __restrict__ gl, const float* __restrict__ gm,
                          const float* __restrict__ gr, const float* __restrict__ prev,
                          float* __restrict__ out, int64_t length) {
  if (length == 1) {
    out[0] = lam[0] * x[0] + gm[0] * prev[0];
    return;
  }
  out[0] = lam[0] * x[0] + (gm[0] * prev[0] + gr[0] * prev[1]);
  for (int64_t p = 1; p < length - 1; ++p) {
    out[p] = lam[p] * x[p] + (gl[p] * prev[p - 1] + gm[p] * prev[p] + gr[p] * prev[p + 1]);
  }
  const int64_t last = length - 1;
  out[last] = lam[last] * x[last] + (gl[last] * prev[last - 1] + gm[last] * prev[last]);
}

inline bool StartsSegment(int64_t scan_index, int64_t chunk) {
  return scan_index == 0 || (chunk > 0 && scan_index % chunk == 0);
}

// The line update of a column scan on padded lines (see ColumnLayout): out[p] for p in
// [0, padded) as in PropagateLine, in whole vectors, edges included. The caller has cleared
// gl[0] and gr[length - 1] and keeps prev[-1] and prev[length..padded] zero, so that out-of-line
// neighbours contribute zero whatever their weight holds; out[length..padded) is written zero.
// `lx` holds lam x.
inline void PropagatePaddedLine(const float* __restrict__ lx, const float* __restrict__ gl,
                                const float* __restrict__ gm, const float* __restrict__ gr,
                                const float* __restrict__ prev, float* __restrict__ out,
                                int64_t length, int64_t padded) {
  for (int64_t p = 0; p < padded; ++p) {
    out[p] = lx[p] + (gl[p] * prev[p - 1] + gm[p] * prev[p] + gr[p] * prev[p + 1]);
  }
  for (int64_t p = length; p < padded; ++p) out[p] = 0.0f;
}

// The first line of a segment on a padded line: out[p] = lx[p] (lam x), zero past `length`.
inline void StartPaddedLine(const float* __restrict__ lx, float* __restrict__ out, int64_t length,
                            int64_t padded) {
  for (int64_t p = 0; p < padded; ++p) out[p] = lx[p];
  for (int64_t p = length; p < padded; ++p) out[p] = 0.0f;
}

// Copies a (rows x cols) block with row stride src_stride into its transpose (cols x rows) with
// row stride dst_stride, converting element types.
template <typename Src, typename Dst>
void TransposeScalar(const Src* __restrict__ src, int64_t src_stride, Dst* __restrict__ dst,
                     int64_t dst_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const Src* src_row = src + r * src_stride;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * dst_stride + r] = FromFloat<Dst>(ToFloat(src_row[c]));
    }
  }
}

// The transpose of the elementwise product of two (rows x cols) blocks, in float32.
template <typename Src>
void TransposeProductScalar(const Src* __restrict__ a, const Src* __restrict__ b,
                            int64_t src_stride, float* __restrict__ dst, int64_t dst_stride,
                            int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * src_stride + c;
      dst[c * dst_stride + r] = ToFloat(b[i]) * ToFloat(a[i]);
    }
  }
}

// A plane region, `rows` rows `row_bytes` long and `stride_bytes` apart.
struct Region {
  const char* base = nullptr;  // none when null
  int64_t stride_bytes = 0;
  int64_t row_bytes = 0;
  int64_t rows = 0;
  bool outside_l1 = false;  // prefetch into the L2 only (see kL1WayBytes)
};

// What a strip transpose fetches ahead: a strip reads (or writes) a little of each of many rows,
// a pattern the hardware prefetchers do not follow, so rows kPrefetchRows ahead of the current
// one (or a region ahead, when shorter) are requested early: of the same region, and past its
// end of the next (the next strip of the plane or the first of the next plane). 2-core EPYC, ms,
// without -> with: (1, 576, 56, 56) l2r 1.83 -> 1.24, (2, 8, 1024, 1024) 25.4 -> 18.5, fused
// 1152x28x28 2.10 -> 1.77; planes that stay in the L2 or L3 pay a little for it (4608x7x7 0.176 ->
// 0.195). 16 or 64 rows ahead: within noise of 32.
constexpr int64_t kPrefetchRows = 32;
// Rows a multiple of this many bytes apart (one way of the L1 data cache: 32 KiB 8-way, or 48 KiB
// 12-way) map the same columns of every row to the same L1 sets, which hold 8 to 12 lines each:
// there rows fetched ahead into the L1 evict the ones being transposed, so they are fetched into
// the L2 only (prefetcht1). 2-core EPYC, ms, (2, 8, 1024, 1024): l2r 19.7 -> 16.8, r2l 22.1 -> 18.4,
// fused l2r 35.8 -> 31.6; at 256x256 (1 KiB rows) the same prefetches cost 5-15%.
constexpr int64_t kL1WayBytes = 4096;

struct Ahead {
  Region current;
  Region next;
};

template <bool kForWrite>
inline void PrefetchRegionRows(const Region& region, int64_t first, int64_t count) {
  if (region.base == nullptr || first >= region.rows) return;
  count = std::min(count, region.rows - first);
  const char* begin = region.base + first * region.stride_bytes;
  const auto fetch = [&](auto locality) {
    if (region.row_bytes == region.stride_bytes) {  // contiguous rows
      PrefetchBytes<kForWrite, locality()>(begin, count * region.row_bytes);
    } else {
      for (int64_t r = 0; r < count; ++r) {
        PrefetchBytes<kForWrite, locality()>(begin + r * region.stride_bytes, region.row_bytes);
      }
    }
  };
  if (region.outside_l1) {
    fetch(std::integral_constant<int, 2>());
  } else {
    fetch(std::integral_constant<int, 3>());
  }
}

// Called as rows [row, row + count) of `ahead.current` are transposed.
template <bool kForWrite>
inline void PrefetchRows(const Ahead& ahead, int64_t row, int64_t count) {
  const int64_t rows = ahead.current.rows, first = row + std::min(kPrefetchRows, rows);
  if (first + count <= rows) {
    PrefetchRegionRows<kForWrite>(ahead.current, first, count);
  } else {
    if (first < rows) PrefetchRegionRows<kForWrite>(ahead.current, first, rows - first);
    const int64_t next_first = std::max<int64_t>(first - rows, 0);
    PrefetchRegionRows<kForWrite>(ahead.next, next_first, first + count - rows - next_first);
  }
}

#if defined(__AVX2__)
// Transposes the 8x8 tile whose rows are v[0..7], in registers (unpack, shuffle, lane permute).
inline void Transpose8x8(__m256 v[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(v[k], v[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(v[k], v[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    v[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}

// Mask of the first `count` (0 to 8) lanes.
inline __m256i FirstLanes(int64_t count) {
  static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - count));
}

// Transposes the (rows x cols) region of a plane at `src` (row stride src_stride) into lines:
// dst[c * dst_stride + r] = src[r * src_stride + c], times scale[r * src_stride + c] where
// `scale` is not null. Reads exactly the region (masked loads at its edges); a line is written in
// whole tiles, up to RoundUp(rows, 8) floats (zeros past rows), so dst_stride must be at least
// that.
void TransposeToLines(const float* __restrict__ src, const float* __restrict__ scale,
                      int64_t src_stride, float* __restrict__ dst, int64_t dst_stride,
                      int64_t rows, int64_t cols, const Ahead& ahead, const Ahead& scale_ahead) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t nr = std::min(kTile, rows - r0);
    PrefetchRows<false>(ahead, r0, kTile);
    if (scale != nullptr) PrefetchRows<false>(scale_ahead, r0, kTile);
    const int64_t row_offset = r0 * src_stride;
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t nc = std::min(kTile, cols - c0);
      __m256 v[8];
      if (nr == kTile && nc == kTile) {
        for (int k = 0; k < 8; ++k) {
          const int64_t i = row_offset + k * src_stride + c0;
          v[k] = _mm256_loadu_ps(src + i);
          if (scale != nullptr) v[k] = _mm256_mul_ps(_mm256_loadu_ps(scale + i), v[k]);
        }
      } else {
        const __m256i mask = FirstLanes(nc);
        for (int k = 0; k < 8; ++k) {
          const int64_t i = row_offset + k * src_stride + c0;
          v[k] = k < nr ? _mm256_maskload_ps(src + i, mask) : _mm256_setzero_ps();
          if (scale != nullptr && k < nr) {
            v[k] = _mm256_mul_ps(_mm256_maskload_ps(scale + i, mask), v[k]);
          }
        }
      }
      Transpose8x8(v);
      float* out = dst + c0 * dst_stride + r0;
      if (nc == kTile) {
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + k * dst_stride, v[k]);
      } else {
        for (int64_t k = 0; k < nc; ++k) _mm256_storeu_ps(out + k * dst_stride, v[k]);
      }
    }
  }
}

// Stores the first `count` (1 to 7) lanes of v at dst. Not vmaskmovps: its stores are
// microcoded on AMD processors (tens of cycles each), and tiles at the edge of small planes
// store through here on every row.
inline void StoreFirstLanes(float* dst, int64_t count, __m256 v) {
#if defined(__AVX512VL__)
  _mm256_mask_storeu_ps(dst, static_cast<__mmask8>((1u << count) - 1u), v);
#else
  __m128 part = _mm256_castps256_ps128(v);
  if (count >= 4) {
    _mm_storeu_ps(dst, part);
    part = _mm256_extractf128_ps(v, 1);
    dst += 4, count -= 4;
  }
  if (count >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), part);
    part = _mm_movehl_ps(part, part);
    dst += 2, count -= 2;
  }
  if (count == 1) _mm_store_ss(dst, part);
#endif
}
#endif

// ---- the tensors of one plane ----------------------------------------------------------------

// Inputs by role: the scanned data (x of the scan, u of the fused scan), lam, the three weight
// sources (the weights gl, gm, gr of the scan, the logits al, am, ar of the fused scan), and the
// fused scan's gate and skip.
enum Slot : int { kData = 0, kLam, kLeft, kMiddle, kRight, kGate, kSkip };
constexpr int kScanInputs = 5;
constexpr int kFusedInputs = 7;

template <typename T, int kInputs>
struct Plane {
  static constexpr bool kFused = kInputs == kFusedInputs;
  const T* in[kInputs];
  T* out;  // h of the scan, y of the fused scan
};

// Plane `index` of a (B, C, H, W) problem: data inputs (B, C, H, W), weight sources (B, G, H, W).
template <typename T, int kInputs>
Plane<T, kInputs> PlaneAt(const ScanGeometry& g, int64_t index, const T* const* inputs, T* out) {
  const int64_t plane_size = g.height * g.width;
  const int64_t b = index / g.channels;
  const int64_t c = index % g.channels;
  const int64_t group = c / (g.channels / g.groups);
  const int64_t data_offset = index * plane_size;
  const int64_t weight_offset = (b * g.groups + group) * plane_size;
  Plane<T, kInputs> plane;
  for (int k = 0; k < kInputs; ++k) {
    const bool weight = k == kLeft || k == kMiddle || k == kRight;
    plane.in[k] = inputs[k] + (weight ? weight_offset : data_offset);
  }
  plane.out = out + data_offset;
  return plane;
}

// ---- writing the lines of a column strip back ------------------------------------------------

// Where the lines of a strip go (see FromLines): position p of line l is element
// p * stride + l of a plane region. The scan stores h there; the fused scan stores
// y = h gate + u skip, reading u, gate and skip at the same element.
template <typename T>
struct StoreH {
  T* h;
  int64_t stride;
  Ahead ahead;

  void Prefetch(int64_t row) const { PrefetchRows<true>(ahead, row, kTile); }
  void Put(int64_t p, int64_t l, float value) const { h[p * stride + l] = FromFloat<T>(value); }
#if defined(__AVX2__)
  void Put(int64_t p, int64_t l, __m256 v) const { _mm256_storeu_ps(h + p * stride + l, v); }
  void Put(int64_t p, int64_t l, __m256i, int64_t count, __m256 v) const {
    StoreFirstLanes(h + p * stride + l, count, v);
  }
#endif
};

template <typename T>
struct StoreGatedH {
  T* y;
  const T* u;
  const T* gate;
  const T* skip;
  int64_t stride;
  Ahead y_ahead, gate_ahead, skip_ahead;  // u was read for this strip already

  void Prefetch(int64_t row) const {
    PrefetchRows<true>(y_ahead, row, kTile);
    PrefetchRows<false>(gate_ahead, row, kTile);
    PrefetchRows<false>(skip_ahead, row, kTile);
  }
  void Put(int64_t p, int64_t l, float value) const {
    const int64_t i = p * stride + l;
    y[i] = FromFloat<T>(value * ToFloat(gate[i]) + ToFloat(u[i]) * ToFloat(skip[i]));
  }
#if defined(__AVX2__)
  void Put(int64_t p, int64_t l, __m256 v) const {
    const int64_t i = p * stride + l;
    const __m256 carried = _mm256_mul_ps(_mm256_loadu_ps(u + i), _mm256_loadu_ps(skip + i));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v, _mm256_loadu_ps(gate + i), carried));
  }
  void Put(int64_t p, int64_t l, __m256i mask, int64_t count, __m256 v) const {
    const int64_t i = p * stride + l;
    const __m256 carried =
        _mm256_mul_ps(_mm256_maskload_ps(u + i, mask), _mm256_maskload_ps(skip + i, mask));
    StoreFirstLanes(y + i, count, _mm256_fmadd_ps(v, _mm256_maskload_ps(gate + i, mask), carried));
  }
#endif
};

#if defined(__AVX2__)
// The inverse of TransposeToLines: `lines` lines of `length` positions at `src` (line stride
// src_stride >= RoundUp(length, 8); reads whole tiles of each line) into the (length x lines)
// region of `sink`: position p of line l to its element (p, l). Writes exactly the region,
// walking it row by row.
template <typename Sink>
void TransposeFromLines(const float* __restrict__ src, int64_t src_stride, int64_t lines,
                        int64_t length, const Sink& sink) {
  for (int64_t p0 = 0; p0 < length; p0 += kTile) {
    const int64_t np = std::min(kTile, length - p0);
    sink.Prefetch(p0);
    for (int64_t l0 = 0; l0 < lines; l0 += kTile) {
      const int64_t nl = std::min(kTile, lines - l0);
      const float* in = src + l0 * src_stride + p0;
      __m256 v[8];
      if (nl == kTile) {
        for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(in + k * src_stride);
      } else {
        for (int k = 0; k < 8; ++k) {
          v[k] = k < nl ? _mm256_loadu_ps(in + k * src_stride) : _mm256_setzero_ps();
        }
      }
      Transpose8x8(v);
      if (np == kTile && nl == kTile) {
        for (int k = 0; k < 8; ++k) sink.Put(p0 + k, l0, v[k]);
      } else if (nl == kTile) {
        for (int64_t k = 0; k < np; ++k) sink.Put(p0 + k, l0, v[k]);
      } else {
        const __m256i mask = FirstLanes(nl);
        for (int64_t k = 0; k < np; ++k) sink.Put(p0 + k, l0, mask, nl, v[k]);
      }
    }
  }
}
#endif

// Plane region -> lines (see TransposeToLines), converting to float32.
template <typename Src>
void ToLines(const Src* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
             int64_t dst_stride, int64_t rows, int64_t cols, [[maybe_unused]] const Ahead& ahead) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Src, float>) {
    TransposeToLines(src, nullptr, src_stride, dst, dst_stride, rows, cols, ahead, ahead);
    return;
  }
#endif
  TransposeScalar(src, src_stride, dst, dst_stride, rows, cols);
}

// Two plane regions -> the lines of their product (lam x), in float32.
template <typename Src>
void ProductToLines(const Src* __restrict__ a, const Src* __restrict__ b, int64_t src_stride,
                    float* __restrict__ dst, int64_t dst_stride, int64_t rows, int64_t cols,
                    [[maybe_unused]] const Ahead& a_ahead, [[maybe_unused]] const Ahead& b_ahead) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Src, float>) {
    TransposeToLines(a, b, src_stride, dst, dst_stride, rows, cols, a_ahead, b_ahead);
    return;
  }
#endif
  TransposeProductScalar(a, b, src_stride, dst, dst_stride, rows, cols);
}

// Lines -> the plane region of `sink` (see TransposeFromLines), converting from float32.
template <typename T, template <typename> class Sink>
void FromLines(const float* __restrict__ src, int64_t src_stride, int64_t lines, int64_t length,
               const Sink<T>& sink) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    TransposeFromLines(src, src_stride, lines, length, sink);
    return;
  }
#endif
  for (int64_t l = 0; l < lines; ++l) {
    for (int64_t p = 0; p < length; ++p) sink.Put(p, l, src[l * src_stride + p]);
  }
}

// ---- row scans -------------------------------------------------------------------------------

// Rows scanned bottom to top (b2t) are descending streams, which the hardware prefetchers do not
// follow across small planes: the planes of a worker run last to first, so that they form one
// descending stream (ScanPlanesOf; the operator orders its tasks the same way). Software
// prefetches of the rows two lines ahead were meant to help too, but never ran (see
// PrefetchBytes); once emitted they made b2t slower: 2-core EPYC, (1, 576, 56, 56) 0.52 -> 0.77 ms,
// (2, 8, 1024, 1024) 7.8 -> 8.7.
bool DescendingPlanes(Direction direction) { return direction == Direction::kBottomToTop; }

// Row scans of a float32 plane: every line is a contiguous row, the previous line is read back
// from the output.
void RowScanFloat(const ScanGeometry& g, const Plane<float, kScanInputs>& plane) {
  const int64_t H = g.height, W = g.width;
  const bool reversed = g.direction == Direction::kBottomToTop;
  for (int64_t s = 0; s < H; ++s) {
    const int64_t i = reversed ? H - 1 - s : s;
    const int64_t offset = i * W;
    float* out = plane.out + offset;
    if (StartsSegment(s, g.chunk)) {
      StartLine(plane.in[kData] + offset, plane.in[kLam] + offset, out, W);
    } else {
      const float* prev = plane.out + (reversed ? offset + W : offset - W);
      PropagateLine(plane.in[kData] + offset, plane.in[kLam] + offset, plane.in[kLeft] + offset,
                    plane.in[kMiddle] + offset, plane.in[kRight] + offset, prev, out, W);
    }
  }
}

// A plane row as float32: the row itself, or its widening into `buffer`.
inline const float* Widened(const float* row, float*, int64_t) { return row; }
inline const float* Widened(const Half* row, float* buffer, int64_t n) {
  HalfLineToFloat(row, buffer, n);
  return buffer;
}

// Where a float32 line bound for a plane row is computed: the row itself, or `buffer` that
// Narrow then rounds into the row.
inline float* Staged(float* row, float*) { return row; }
inline float* Staged(Half*, float* buffer) { return buffer; }
inline void Narrow(const float*, float*, int64_t) {}
inline void Narrow(const float* buffer, Half* row, int64_t n) { FloatLineToHalf(buffer, row, n); }

// Float32 line buffers of a row scan through buffers: x, lam, the three weight sources, the
// previous and the current line of h, and for the fused scan the three normalized weights.
constexpr int64_t kScanRowBuffers = 7;
constexpr int64_t kFusedRowBuffers = 10;

// Row scans through float32 line buffers: float16 scans (rows widened on the way in, h rounded
// on the way out) and fused scans (weights normalized from the logits, h kept in float32,
// y = h gate + u skip written, rounded once).
template <typename T, int kInputs>
void RowScanLines(const ScanGeometry& g, const Plane<T, kInputs>& plane, float* scratch) {
  constexpr bool kFused = Plane<T, kInputs>::kFused;
  static_assert(kFused || std::is_same_v<T, Half>,
                "float32 scans read h back from the output (RowScanFloat)");
  const int64_t H = g.height, W = g.width;
  float* x = scratch;
  float* lam = x + W;
  float* sources[3] = {lam + W, lam + 2 * W, lam + 3 * W};
  float* prev = lam + 4 * W;
  float* out = prev + W;
  float* weights[3] = {out + W, out + 2 * W, out + 3 * W};  // fused only
  const bool reversed = g.direction == Direction::kBottomToTop;
  for (int64_t s = 0; s < H; ++s) {
    const int64_t i = reversed ? H - 1 - s : s;
    const int64_t offset = i * W;
    const float* x_line = Widened(plane.in[kData] + offset, x, W);
    const float* lam_line = Widened(plane.in[kLam] + offset, lam, W);
    if (StartsSegment(s, g.chunk)) {
      StartLine(x_line, lam_line, out, W);
    } else {
      const float* l = Widened(plane.in[kLeft] + offset, sources[0], W);
      const float* m = Widened(plane.in[kMiddle] + offset, sources[1], W);
      const float* r = Widened(plane.in[kRight] + offset, sources[2], W);
      if constexpr (kFused) {
        NormalizeLine(l, m, r, weights[0], weights[1], weights[2], W);
        l = weights[0], m = weights[1], r = weights[2];
      }
      PropagateLine(x_line, lam_line, l, m, r, prev, out, W);
    }
    if constexpr (kFused) {
      T* y_row = plane.out + offset;
      float* y = Staged(y_row, sources[0]);
      GateSkipLine(out, x_line, Widened(plane.in[kGate] + offset, sources[1], W),
                   Widened(plane.in[kSkip] + offset, sources[2], W), y, W);
      Narrow(y, y_row, W);
    } else {
      Narrow(out, plane.out + offset, W);
    }
    std::swap(prev, out);
  }
}

// Fused float32 row scans of small planes with short rows (GSPN-T's 7x7, 14x14 and 28x28 maps):
// per line, the weights of a row of 7, 14 or 28 went through zero-padded blocks of 16 and short
// elementwise loops (1x4608x7² fused t2b: 4.6x its memory floor). Here the plane is one range: its
// weights are normalized in one pass over all H W positions (row edges from masks), the rows
// scanned into h in scratch, and y = h gate + u skip written in one pass. Lines that start a
// segment get weights they do not read (at most every other line, chunk 2), still cheaper than
// per-line blocks. 2-core EPYC, fused t2b: 4608x7² 0.83 -> 0.36 ms, 2304x14² 0.97 -> 0.55,
// 1152x28² 1.23 -> 0.94; slower for rows of whole vectors (16x32²: 0.033 -> 0.047) and for planes
// whose six scratch planes leave L1 (576x56²: 1.55 -> 2.14), which keep the line path.
constexpr int64_t kShortRow = 32;             // rows shorter than this take the plane path ...
constexpr int64_t kPlanePathPositions = 1024;  // ... in planes of at most this many positions
inline bool PlanePathRows(const ScanGeometry& g) {
  return IsRowScan(g.direction) && g.width < kShortRow && g.height * g.width <= kPlanePathPositions;
}

// Scratch of the plane path: the row-edge masks (left, right; written once per call by
// RowEdgeMasks), the three weights and h, H W floats each (24 KiB at most).
constexpr int64_t kPlanePathBuffers = 6;

void RowEdgeMasks(const ScanGeometry& g, float* scratch) {
  const int64_t H = g.height, W = g.width;
  float* left = scratch;
  float* right = left + H * W;
  for (int64_t p = 0; p < H * W; ++p) {
    const int64_t w = p % W;
    left[p] = w != 0 ? 1.0f : 0.0f;
    right[p] = w != W - 1 ? 1.0f : 0.0f;
  }
}

void RowScanFusedPlane(const ScanGeometry& g, const Plane<float, kFusedInputs>& plane,
                       float* scratch) {
  const int64_t H = g.height, W = g.width, size = H * W;
  const float* left = scratch;
  const float* right = left + size;
  float* gl = scratch + 2 * size;
  float* gm = gl + size;
  float* gr = gm + size;
  float* h = gr + size;
  NormalizeWith(plane.in[kLeft], plane.in[kMiddle], plane.in[kRight], gl, gm, gr, size,
                MaskEdges{left, right});
  const float* x = plane.in[kData];
  const float* lam = plane.in[kLam];
  const bool reversed = g.direction == Direction::kBottomToTop;
  for (int64_t s = 0; s < H; ++s) {
    const int64_t i = reversed ? H - 1 - s : s;
    const int64_t offset = i * W;
    if (StartsSegment(s, g.chunk)) {
      StartLine(x + offset, lam + offset, h + offset, W);
    } else {
      const float* prev = h + (reversed ? offset + W : offset - W);
      PropagateLine(x + offset, lam + offset, gl + offset, gm + offset, gr + offset, prev,
                    h + offset, W);
    }
  }
  GateSkipLine(h, x, plane.in[kGate], plane.in[kSkip], plane.out, size);
}

// ---- column scans ----------------------------------------------------------------------------

#if defined(__AVX2__)
// The lines of one strip of a column scan, for lines of at most 8 kVectors positions: the
// previous line stays in registers and its neighbours prev[p - 1], prev[p + 1] are made by lane
// permutes. (Short lines read from memory would load each previous line right after storing it,
// across its vector boundaries, and wait on store forwarding every line.) Same update and edge
// rules as PropagatePaddedLine, without touching the scratch weights. A line holds the columns of
// `length` / `segment` planes end to end (see BatchPlanes), each `segment` positions long: the
// neighbours across a plane's edge, and their weights, are masked to zero (a select, so that
// even inf or NaN of another plane contributes exactly zero). `carry` holds the line before the
// strip (zero padded) and receives its last line.
template <int kVectors, bool kSegmented>
void ScanShortLines(const float* lxs, const float* gls, const float* gms,
                    const float* grs, float* hs, float* carry, int64_t stride, int64_t length,
                    int64_t segment, int64_t n, int64_t j0, int64_t width, bool reversed,
                    int64_t chunk) {
  const __m256 zero = _mm256_setzero_ps();
  // Lanes of each vector: inside the line, with a neighbour above (p - 1 in the same plane),
  // with one below (p + 1 in the same plane). One plane: only the last vector has lanes outside
  // or without a neighbour below (the first lane's above is cleared by the blend below).
  __m256 in_line[kVectors], has_above[kVectors], has_below[kVectors];
  if constexpr (kSegmented) {
    int64_t q = 0;  // p % segment
    for (int k = 0; k < kVectors; ++k) {
      alignas(32) int32_t inside[kTile], above[kTile], below[kTile];
      for (int64_t lane = 0; lane < kTile; ++lane) {
        const bool in = k * kTile + lane < length;
        inside[lane] = in ? -1 : 0;
        above[lane] = in && q != 0 ? -1 : 0;
        below[lane] = in && q != segment - 1 ? -1 : 0;
        q = q + 1 == segment ? 0 : q + 1;
      }
      const auto load = [](const int32_t* lanes) {
        return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
      };
      in_line[k] = load(inside), has_above[k] = load(above), has_below[k] = load(below);
    }
  } else {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int32_t last_lane = static_cast<int32_t>((length - 1) % kTile);
    in_line[kVectors - 1] =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(last_lane + 1), lanes));
    has_below[kVectors - 1] =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(last_lane), lanes));
  }
  const __m256i rotate_up = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  const __m256i rotate_down = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
  __m256 prev[kVectors];
  for (int k = 0; k < kVectors; ++k) prev[k] = _mm256_loadu_ps(carry + k * kTile);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t line = reversed ? n - 1 - t : t;  // column j0 + line
    const int64_t s = reversed ? width - 1 - (j0 + line) : j0 + line;
    const int64_t offset = line * stride;
    __m256 next[kVectors];
    if (StartsSegment(s, chunk)) {
      for (int k = 0; k < kVectors; ++k) {
        next[k] = _mm256_loadu_ps(lxs + offset + k * kTile);
      }
    } else {
      __m256 up[kVectors], down[kVectors];  // lanes rotated by one, fixed up below
      for (int k = 0; k < kVectors; ++k) {
        up[k] = _mm256_permutevar8x32_ps(prev[k], rotate_up);
        down[k] = _mm256_permutevar8x32_ps(prev[k], rotate_down);
      }
      for (int k = 0; k < kVectors; ++k) {
        __m256 above = _mm256_blend_ps(up[k], k > 0 ? up[k - 1] : zero, 0x01);
        __m256 below = _mm256_blend_ps(down[k], k + 1 < kVectors ? down[k + 1] : zero, 0x80);
        __m256 gl = _mm256_loadu_ps(gls + offset + k * kTile);
        __m256 gr = _mm256_loadu_ps(grs + offset + k * kTile);
        if constexpr (kSegmented) {
          above = _mm256_and_ps(above, has_above[k]);
          below = _mm256_and_ps(below, has_below[k]);
          gl = _mm256_and_ps(gl, has_above[k]);
          gr = _mm256_and_ps(gr, has_below[k]);
        } else {
          if (k == 0) gl = _mm256_blend_ps(gl, zero, 0x01);
          if (k == kVectors - 1) gr = _mm256_and_ps(gr, has_below[k]);
        }
        // Ordered for a short dependency chain from prev (the permutes run beside the first FMA).
        __m256 sum = _mm256_fmadd_ps(_mm256_loadu_ps(gms + offset + k * kTile), prev[k],
                                     _mm256_loadu_ps(lxs + offset + k * kTile));
        sum = _mm256_fmadd_ps(gl, above, sum);
        next[k] = _mm256_fmadd_ps(gr, below, sum);
      }
    }
    // Lines are padded to whole vectors: only the last one has lanes outside.
    next[kVectors - 1] = _mm256_and_ps(next[kVectors - 1], in_line[kVectors - 1]);
    for (int k = 0; k < kVectors; ++k) {
      _mm256_storeu_ps(hs + offset + k * kTile, next[k]);
      prev[k] = next[k];
    }
  }
  for (int k = 0; k < kVectors; ++k) _mm256_storeu_ps(carry + k * kTile, prev[k]);
}
#endif
// Column scans: strips of columns are transposed into float32 scratch (see ColumnLayout) so that
// each column (a line of length H) is contiguous, scanned, and transposed back. `planes` holds
// `count` planes (at most BatchPlanes) scanned together, their columns end to end in each line;
// `next_planes` the `next_count` planes scanned after them (prefetched, never written). The fused
// scan normalizes the transposed logits in place into weights, and writes y = h gate + u skip on
// the way back.
template <typename T, int kInputs>
void ColumnScan(const ScanGeometry& g, const Plane<T, kInputs>* planes, int64_t count,
                const Plane<T, kInputs>* next_planes, int64_t next_count, float* scratch) {
  using PlaneT = Plane<T, kInputs>;
  const int64_t H = g.height, W = g.width;
  const ColumnLayout layout = MakeColumnLayout(g, count);
  const int64_t strip = layout.strip, stride = layout.line_stride, padded = layout.padded;
  const int64_t length = count * H;  // positions of a line
  float* lxs = scratch + kGuard;  // lam x; line t of a block at block + t * stride
  float* gls = lxs + layout.block;
  float* gms = gls + layout.block;
  float* grs = gms + layout.block;
  float* hs = grs + layout.block;
  float* carry = hs - kGuard + layout.block + kGuard;  // the last line of the previous strip
  float* const blocks[kRight + 1] = {nullptr, nullptr, gls, gms, grs};  // of the weight slots
  // Zero the gaps between the lines of h, and the guards of the carried line.
  for (int64_t t = 0; t <= strip; ++t) {
    float* gap = hs + (t - 1) * stride + padded;
    std::fill(t == 0 ? hs - kGuard : gap, hs + t * stride, 0.0f);
  }
  std::fill(carry - kGuard, carry + padded + kGuard, 0.0f);
  const bool reversed = g.direction == Direction::kRightToLeft;
  const int64_t strip_count = (W + strip - 1) / strip;
  // Strips are visited in scan order; strip k covers columns [j0, j0 + n).
  const auto columns = [&](int64_t k, int64_t* j0, int64_t* n) {
    *j0 = reversed ? std::max<int64_t>(W - (k + 1) * strip, 0) : k * strip;
    *n = reversed ? (W - k * strip) - *j0 : std::min(strip, W - *j0);
  };
  // Rows of strip k of input `slot` (kOutput: the output) of plane p, and of what that plane's
  // loop reaches next: its next strip, else the first strip of the plane in its place in the
  // next batch. `planes_spanned` > 1: the planes from p on, adjacent in memory.
  constexpr int kOutput = -1;
  const auto ahead = [&](int64_t k, int slot, int64_t p, int64_t planes_spanned) {
    const auto region = [&](const PlaneT* target, int64_t strip_index, int64_t spanned) {
      if (target == nullptr || spanned <= 0) return Region{};
      int64_t j0, n;
      columns(strip_index, &j0, &n);
      const T* base = slot == kOutput ? target->out : target->in[slot];
      const int64_t row_stride = W * static_cast<int64_t>(sizeof(T));
      return Region{reinterpret_cast<const char*>(base + j0), row_stride,
                    n * static_cast<int64_t>(sizeof(T)), spanned * H,
                    row_stride % kL1WayBytes == 0};
    };
    const PlaneT* later = p < next_count ? next_planes + p : nullptr;
    return Ahead{region(planes + p, k, planes_spanned),
                 k + 1 < strip_count
                     ? region(planes + p, k + 1, planes_spanned)
                     : region(later, 0, std::min(planes_spanned, next_count - p))};
  };
  // Whether input `slot` of the batch is one (count H, W) region: always for the data (u, x,
  // lam, gate, skip, the output), for the weights when each plane has its own (G = C).
  const auto adjacent = [&](int slot) {
    for (int64_t p = 1; p < count; ++p) {
      if (planes[p].in[slot] != planes[0].in[slot] + p * H * W) return false;
    }
    return true;
  };
  // The batch's lines back, in one pass over the planes' adjacent outputs.
  const auto store = [&](int64_t k, int64_t j0, int64_t n) {
    const PlaneT& plane = planes[0];
    if constexpr (PlaneT::kFused) {
      const StoreGatedH<T> sink{plane.out + j0,
                                plane.in[kData] + j0,
                                plane.in[kGate] + j0,
                                plane.in[kSkip] + j0,
                                W,
                                ahead(k, kOutput, 0, count),
                                ahead(k, kGate, 0, count),
                                ahead(k, kSkip, 0, count)};
      FromLines(hs, stride, n, length, sink);
    } else {
      FromLines(hs, stride, n, length, StoreH<T>{plane.out + j0, W, ahead(k, kOutput, 0, count)});
    }
  };
  for (int64_t k = 0; k < strip_count; ++k) {
    int64_t j0, n;
    columns(k, &j0, &n);
    // x and lam of adjacent planes are adjacent: one region. Where rows are a multiple of 4 KiB
    // apart, the rows of x and lam (same offsets in their tensors) all map to one L1 set and
    // their product's transpose thrashes it (1024 wide: 10-15% slower than two transposes);
    // there lam goes through the h block (free until the scan) and is multiplied in after.
    if ((W * static_cast<int64_t>(sizeof(T))) % 4096 != 0) {
      ProductToLines(planes[0].in[kData] + j0, planes[0].in[kLam] + j0, W, lxs, stride, length,
                     n, ahead(k, kData, 0, count), ahead(k, kLam, 0, count));
    } else {
      ToLines(planes[0].in[kData] + j0, W, lxs, stride, length, n, ahead(k, kData, 0, count));
      ToLines(planes[0].in[kLam] + j0, W, hs, stride, length, n, ahead(k, kLam, 0, count));
      for (int64_t t = 0; t < n; ++t) {
        float* __restrict__ lx = lxs + t * stride;
        const float* __restrict__ lam = hs + t * stride;
        for (int64_t p = 0; p < padded; ++p) lx[p] = lam[p] * lx[p];
      }
    }
    for (int slot = kLeft; slot <= kRight; ++slot) {
      if (adjacent(slot)) {
        ToLines(planes[0].in[slot] + j0, W, blocks[slot], stride, length, n,
                ahead(k, slot, 0, count));
        continue;
      }
      // In increasing p: a plane's last tile writes past its H positions into the next plane's.
      for (int64_t p = 0; p < count; ++p) {
        ToLines(planes[p].in[slot] + j0, W, blocks[slot] + p * H, stride, H, n,
                ahead(k, slot, p, 1));
      }
    }
    if constexpr (PlaneT::kFused) {
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t p = 0; p < count; ++p) {
          const int64_t offset = t * stride + p * H;
          NormalizeLine(gls + offset, gms + offset, grs + offset, gls + offset, gms + offset,
                        grs + offset, H);
        }
      }
    }
#if defined(__AVX2__)
    if (padded <= kMaxShortLine) {
      const auto scan = [&](auto vectors, auto segmented) {
        ScanShortLines<decltype(vectors)::value, decltype(segmented)::value>(
            lxs, gls, gms, grs, hs, carry, stride, length, H, n, j0, W, reversed, g.chunk);
      };
      const auto scan_lines = [&](auto segmented) {
        switch (padded / kTile) {
          case 1: scan(std::integral_constant<int, 1>(), segmented); break;
          case 2: scan(std::integral_constant<int, 2>(), segmented); break;
          case 3: scan(std::integral_constant<int, 3>(), segmented); break;
          case 4: scan(std::integral_constant<int, 4>(), segmented); break;
          case 5: scan(std::integral_constant<int, 5>(), segmented); break;
          case 6: scan(std::integral_constant<int, 6>(), segmented); break;
          case 7: scan(std::integral_constant<int, 7>(), segmented); break;
          default: scan(std::integral_constant<int, 8>(), segmented); break;
        }
      };
      if (count > 1) {
        scan_lines(std::true_type());
      } else {
        scan_lines(std::false_type());
      }
      store(k, j0, n);
      continue;
    }
#endif
    // Lines too long for registers hold one plane (BatchPlanes).
    const float* prev = carry;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t line = reversed ? n - 1 - t : t;  // column j0 + line
      const int64_t s = reversed ? W - 1 - (j0 + line) : j0 + line;
      const int64_t offset = line * stride;
      if (StartsSegment(s, g.chunk)) {
        StartPaddedLine(lxs + offset, hs + offset, H, padded);
      } else {
        gls[offset] = 0.0f;  // no neighbour above the first position
        grs[offset + H - 1] = 0.0f;  // nor below the last
        PropagatePaddedLine(lxs + offset, gls + offset, gms + offset, grs + offset, prev,
                            hs + offset, H, padded);
      }
      prev = hs + offset;
    }
    if (k + 1 < strip_count) std::memcpy(carry, prev, static_cast<size_t>(padded) * sizeof(float));
    store(k, j0, n);
  }
}

// Planes [first, first + count) of a scan or fused scan (kInputs inputs, in Slot order).
template <typename T, int kInputs>
void ScanPlanesOf(const ScanGeometry& g, int64_t first, int64_t count, const T* const* inputs,
                  T* out, float* scratch) {
  using PlaneT = Plane<T, kInputs>;
  if (IsRowScan(g.direction)) {
    const bool descending = DescendingPlanes(g.direction);
    constexpr bool kFloatFused = std::is_same_v<T, float> && PlaneT::kFused;
    const bool plane_path = kFloatFused && PlanePathRows(g);
    if (plane_path) RowEdgeMasks(g, scratch);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t index = descending ? first + count - 1 - k : first + k;
      const PlaneT plane = PlaneAt<T, kInputs>(g, index, inputs, out);
      if constexpr (kFloatFused) {
        if (plane_path) {
          RowScanFusedPlane(g, plane, scratch);
          continue;
        }
      }
      if constexpr (std::is_same_v<T, float> && !PlaneT::kFused) {
        RowScanFloat(g, plane);
      } else {
        RowScanLines(g, plane, scratch);
      }
    }
    return;
  }
  // Batches of BatchPlanes planes; the planes after a batch (the next batch, or past `count`
  // those another worker scans) are prefetched.
  const int64_t batch = BatchPlanes(g), total = g.batch * g.channels;
  PlaneT planes[2][kMaxBatchPlanes];
  const auto fill = [&](PlaneT* target, int64_t begin) {
    const int64_t n = std::min(batch, total - begin);
    for (int64_t p = 0; p < n; ++p) target[p] = PlaneAt<T, kInputs>(g, begin + p, inputs, out);
    return n;
  };
  int64_t current = 0;
  fill(planes[current], first);
  for (int64_t begin = first; begin < first + count; begin += batch) {
    const int64_t n = std::min(batch, first + count - begin);
    const int64_t next_count = begin + n < total ? fill(planes[1 - current], begin + n) : 0;
    ColumnScan(g, planes[current], n, planes[1 - current], next_count, scratch);
    current = 1 - current;
  }
}

}  // namespace

size_t ScratchFloats(const ScanGeometry& g, bool half_precision) {
  if (IsRowScan(g.direction)) {
    return half_precision ? static_cast<size_t>(kScanRowBuffers * g.width) : 0;
  }
  // Any batch of 1 to BatchPlanes planes (the last of a call may be short; the block size is
  // not monotonic in the batch, as strips narrow when lines grow).
  size_t floats = 0;
  for (int64_t planes = 1; planes <= BatchPlanes(g); ++planes) {
    const ColumnLayout layout = MakeColumnLayout(g, planes);
    floats = std::max(floats, static_cast<size_t>(kColumnBlocks * layout.block + layout.carry));
  }
  return floats;
}

size_t FusedScratchFloats(const ScanGeometry& g, bool half_precision) {
  if (IsRowScan(g.direction)) {
    const int64_t plane_path = half_precision || !PlanePathRows(g)
                                   ? 0 : kPlanePathBuffers * g.height * g.width;
    return static_cast<size_t>(std::max(kFusedRowBuffers * g.width, plane_path));
  }
  return ScratchFloats(g, half_precision);
}

template <typename T>
void ScanPlanes(const ScanGeometry& g, int64_t first, int64_t count, const T* x, const T* lam,
                const T* gl, const T* gm, const T* gr, T* h, float* scratch) {
  const T* const inputs[kScanInputs] = {x, lam, gl, gm, gr};
  ScanPlanesOf<T, kScanInputs>(g, first, count, inputs, h, scratch);
}

template <typename T>
void FusedScanPlanes(const ScanGeometry& g, int64_t first, int64_t count, const T* u,
                     const T* lam, const T* al, const T* am, const T* ar, const T* gate,
                     const T* skip, T* y, float* scratch) {
  const T* const inputs[kFusedInputs] = {u, lam, al, am, ar, gate, skip};
  ScanPlanesOf<T, kFusedInputs>(g, first, count, inputs, y, scratch);
}

template <typename T>
void ScanPlane(const ScanGeometry& g, int64_t plane_index, const T* x, const T* lam, const T* gl,
               const T* gm, const T* gr, T* h, float* scratch) {
  ScanPlanes(g, plane_index, 1, x, lam, gl, gm, gr, h, scratch);
}

template <typename T>
void FusedScanPlane(const ScanGeometry& g, int64_t plane_index, const T* u, const T* lam,
                    const T* al, const T* am, const T* ar, const T* gate, const T* skip, T* y,
                    float* scratch) {
  FusedScanPlanes(g, plane_index, 1, u, lam, al, am, ar, gate, skip, y, scratch);
}

template void ScanPlane<float>(const ScanGeometry&, int64_t, const float*, const float*,
                               const float*, const float*, const float*, float*, float*);
template void ScanPlane<Half>(const ScanGeometry&, int64_t, const Half*, const Half*, const Half*,
                              const Half*, const Half*, Half*, float*);
template void FusedScanPlane<float>(const ScanGeometry&, int64_t, const float*, const float*,
                                    const float*, const float*, const float*, const float*,
                                    const float*, float*, float*);
template void ScanPlanes<float>(const ScanGeometry&, int64_t, int64_t, const float*, const float*,
                                const float*, const float*, const float*, float*, float*);
template void ScanPlanes<Half>(const ScanGeometry&, int64_t, int64_t, const Half*, const Half*,
                               const Half*, const Half*, const Half*, Half*, float*);
template void FusedScanPlanes<float>(const ScanGeometry&, int64_t, int64_t, const float*,
                                     const float*, const float*, const float*, const float*,
                                     const float*, const float*, float*, float*);
template void FusedScanPlanes<Half>(const ScanGeometry&, int64_t, int64_t, const Half*,
                                    const Half*, const Half*, const Half*, const Half*, const Half*,
                                    const Half*, Half*, float*);
template void FusedScanPlane<Half>(const ScanGeometry&, int64_t, const Half*, const Half*,
                                   const Half*, const Half*, const Half*, const Half*, const Half*,
                                   Half*, float*);

}  // namespace gspn

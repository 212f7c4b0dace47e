// CPU kernel of the GSPN scan. See gspn_scan_kernel.h and SPEC.md section 2.
//
// Memory order. Tensors are row-major NCHW. A row scan (t2b, b2t) walks lines that are contiguous
// rows, so each line update is a contiguous, vectorizable loop over the W positions, reading the
// previous line from the output itself (float32) or from a float32 line buffer (float16).
// A column scan (l2r, r2l) walks columns, which are strided in memory. It is processed in strips
// of adjacent columns (the whole plane for small maps, else L1-sized strips; see
// MakeColumnLayout): the strip is transposed into zero-padded float32 lines in scratch with 8x8
// register transposes (masked at the plane's edges), scanned line by line (lines of up to 64
// positions with the previous line held in registers, longer ones with a vectorized line update
// that reads it back), and transposed back; rows a little ahead are prefetched. Only the last line
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
constexpr int64_t kMinStripLines = 16;  // a whole 64-byte cache line of each float32 row read
constexpr int64_t kGuard = 8;           // zero floats around each line of h (see ColumnLayout)
constexpr int64_t kCacheLine = 16;      // floats
constexpr int64_t kMaxShortLine = 64;   // longest line scanned in registers (ScanShortLines)
// Strips are sized so that their six transposed blocks stay in a core's L1 data cache (32 KiB
// and more on the AVX2 machines this targets) next to the rows being read.
constexpr int64_t kStripCacheBytes = int64_t{32} << 10;

inline int64_t RoundUp(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Scratch of a column scan: six transposed blocks (x, lam, gl, gm, gr, h) of `strip` lines, then
// the line carried from one strip to the next. Line t of a block starts at
// kGuard + t * line_stride: H floats, zero padding to `padded` = RoundUp(H, 8) (so that the line
// update and the tile transposes work on whole 8-float vectors), and a gap to the next line that
// holds at least kGuard floats, kept zero in the h block and the carry: the out-of-line
// neighbours prev[-1] and prev[H] of the line update. The line stride is padded by a cache line
// more where it would be a multiple of 512 bytes: the eight lines a tile transpose writes would
// otherwise share one or few L1 sets (4 KiB per way) with the eight rows it reads, which share a
// set when W is a power of two (unpadded, 1024-high strips of 32 columns ran 1.9x slower).
// Blocks are one cache line more than their lines apart, so that the same position of the six
// blocks does not share an address modulo 4 KiB (the line update's loads would wait on its
// store).
struct ColumnLayout {
  int64_t strip;
  int64_t padded;
  int64_t line_stride;
  int64_t block;
  int64_t carry;  // floats of the carried line, guards included
};

// Strip width: the whole plane when its six blocks fit kStripCacheBytes (maps up to 28x28 and
// tall narrow ones), else the widest strips of whole tiles (at least kMinStripLines columns)
// that fit, evened out over the plane. The six blocks never take more than kMaxStripScratchBytes
// unless a single column needs more (H > ~349000): for H > 21845 strips narrow below 16 columns.
ColumnLayout MakeColumnLayout(const ScanGeometry& g) {
  const int64_t padded = RoundUp(g.height, kTile);
  int64_t line_stride = padded + kGuard;
  if (line_stride % (8 * kCacheLine) == 0) line_stride += kCacheLine;
  const int64_t block_extra = kGuard + kCacheLine;
  const int64_t line_bytes = 6 * line_stride * static_cast<int64_t>(sizeof(float));
  const int64_t extra_bytes = 6 * block_extra * static_cast<int64_t>(sizeof(float));
  const int64_t fitting = (static_cast<int64_t>(kMaxStripScratchBytes) - extra_bytes) / line_bytes;
  int64_t strip = std::max(kMinStripLines, kStripCacheBytes / line_bytes / kTile * kTile);
  if (strip < g.width) {
    const int64_t strips = (g.width + strip - 1) / strip;
    strip = RoundUp((g.width + strips - 1) / strips, kTile);
  }
  strip = std::max<int64_t>(1, std::min({strip, fitting, g.width}));
  return {strip, padded, line_stride, kGuard + strip * line_stride + block_extra,
          padded + 2 * kGuard};
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
inline void PropagatePaddedLine(const float* __restrict__ x, const float* __restrict__ lam,
                                const float* __restrict__ gl, const float* __restrict__ gm,
                                const float* __restrict__ gr, const float* __restrict__ prev,
                                float* __restrict__ out, int64_t length, int64_t padded) {
  for (int64_t p = 0; p < padded; ++p) {
    out[p] = lam[p] * x[p] + (gl[p] * prev[p - 1] + gm[p] * prev[p] + gr[p] * prev[p + 1]);
  }
  for (int64_t p = length; p < padded; ++p) out[p] = 0.0f;
}

// The first line of a segment on a padded line: out[p] = lam[p] x[p], zero past `length`.
inline void StartPaddedLine(const float* __restrict__ x, const float* __restrict__ lam,
                            float* __restrict__ out, int64_t length, int64_t padded) {
  for (int64_t p = 0; p < padded; ++p) out[p] = lam[p] * x[p];
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

// A plane region, `rows` rows `row_bytes` long and `stride_bytes` apart.
struct Region {
  const char* base = nullptr;  // none when null
  int64_t stride_bytes = 0;
  int64_t row_bytes = 0;
  int64_t rows = 0;
};

// What a strip transpose fetches ahead: a strip reads (or writes) a little of each of many rows,
// a pattern the hardware prefetchers do not follow, so rows kPrefetchRows ahead of the current
// one (or a region ahead, when shorter) are requested early: of the same region, and past its
// end of the next (the next strip of the plane or the first of the next plane). Not further:
// rows W floats apart map to few cache sets when W is a power of two, and lines fetched too
// early would be evicted unused (a whole strip ahead gained nothing at 1024x1024).
constexpr int64_t kPrefetchRows = 32;

struct Ahead {
  Region current;
  Region next;
};

template <bool kForWrite>
inline void PrefetchRegionRows(const Region& region, int64_t first, int64_t count) {
  if (region.base == nullptr || first >= region.rows) return;
  count = std::min(count, region.rows - first);
  constexpr int kLine = 64;
  const auto fetch = [](const char* begin, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += kLine) __builtin_prefetch(begin + b, kForWrite, 3);
    __builtin_prefetch(begin + bytes - 1, kForWrite, 3);
  };
  const char* begin = region.base + first * region.stride_bytes;
  if (region.row_bytes == region.stride_bytes) {  // contiguous rows
    fetch(begin, count * region.row_bytes);
  } else {
    for (int64_t r = 0; r < count; ++r) fetch(begin + r * region.stride_bytes, region.row_bytes);
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
// dst[c * dst_stride + r] = src[r * src_stride + c]. Reads exactly the region (masked loads at
// its edges); a line is written in whole tiles, up to RoundUp(rows, 8) floats (zeros past rows),
// so dst_stride must be at least that.
void TransposeToLines(const float* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
                      int64_t dst_stride, int64_t rows, int64_t cols, const Ahead& ahead) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t nr = std::min(kTile, rows - r0);
    PrefetchRows<false>(ahead, r0, kTile);
    const float* src_rows = src + r0 * src_stride;
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t nc = std::min(kTile, cols - c0);
      __m256 v[8];
      if (nr == kTile && nc == kTile) {
        for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(src_rows + k * src_stride + c0);
      } else {
        const __m256i mask = FirstLanes(nc);
        for (int k = 0; k < 8; ++k) {
          v[k] = k < nr ? _mm256_maskload_ps(src_rows + k * src_stride + c0, mask)
                        : _mm256_setzero_ps();
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

// The inverse of TransposeToLines: `lines` lines of `length` positions at `src` (line stride
// src_stride >= RoundUp(length, 8); reads whole tiles of each line) into the (length x lines)
// region of a plane at `dst`: dst[p * dst_stride + l] = src[l * src_stride + p]. Writes exactly
// the region, walking it row by row.
void TransposeFromLines(const float* __restrict__ src, int64_t src_stride, float* __restrict__ dst,
                        int64_t dst_stride, int64_t lines, int64_t length, const Ahead& ahead) {
  for (int64_t p0 = 0; p0 < length; p0 += kTile) {
    const int64_t np = std::min(kTile, length - p0);
    PrefetchRows<true>(ahead, p0, kTile);
    float* dst_rows = dst + p0 * dst_stride;
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
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst_rows + k * dst_stride + l0, v[k]);
      } else {
        const __m256i mask = FirstLanes(nl);
        for (int64_t k = 0; k < np; ++k) {
          _mm256_maskstore_ps(dst_rows + k * dst_stride + l0, mask, v[k]);
        }
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
    TransposeToLines(src, src_stride, dst, dst_stride, rows, cols, ahead);
    return;
  }
#endif
  TransposeScalar(src, src_stride, dst, dst_stride, rows, cols);
}

// Lines -> plane region (see TransposeFromLines), converting from float32.
template <typename Dst>
void FromLines(const float* __restrict__ src, int64_t src_stride, Dst* __restrict__ dst,
               int64_t dst_stride, int64_t lines, int64_t length,
               [[maybe_unused]] const Ahead& ahead) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Dst, float>) {
    TransposeFromLines(src, src_stride, dst, dst_stride, lines, length, ahead);
    return;
  }
#endif
  TransposeScalar(src, src_stride, dst, dst_stride, lines, length);
}

template <typename T>
struct Plane {
  const T* x;
  const T* lam;
  const T* gl;
  const T* gm;
  const T* gr;
  T* h;
};

// Row scans of a float32 plane: every line is a contiguous row, the previous line is read back
// from the output.
void RowScanFloat(const ScanGeometry& g, const Plane<float>& plane) {
  const int64_t H = g.height, W = g.width;
  const bool reversed = g.direction == Direction::kBottomToTop;
  for (int64_t s = 0; s < H; ++s) {
    const int64_t i = reversed ? H - 1 - s : s;
    const int64_t offset = i * W;
    float* out = plane.h + offset;
    if (StartsSegment(s, g.chunk)) {
      StartLine(plane.x + offset, plane.lam + offset, out, W);
    } else {
      const float* prev = plane.h + (reversed ? offset + W : offset - W);
      PropagateLine(plane.x + offset, plane.lam + offset, plane.gl + offset, plane.gm + offset,
                    plane.gr + offset, prev, out, W);
    }
  }
}

// Row scans of a float16 plane: each row is widened to float32 line buffers first.
void RowScanHalf(const ScanGeometry& g, const Plane<Half>& plane, float* scratch) {
  const int64_t H = g.height, W = g.width;
  float* x = scratch;
  float* lam = x + W;
  float* gl = lam + W;
  float* gm = gl + W;
  float* gr = gm + W;
  float* prev = gr + W;
  float* out = prev + W;
  const bool reversed = g.direction == Direction::kBottomToTop;
  for (int64_t s = 0; s < H; ++s) {
    const int64_t offset = (reversed ? H - 1 - s : s) * W;
    HalfLineToFloat(plane.x + offset, x, W);
    HalfLineToFloat(plane.lam + offset, lam, W);
    if (StartsSegment(s, g.chunk)) {
      StartLine(x, lam, out, W);
    } else {
      HalfLineToFloat(plane.gl + offset, gl, W);
      HalfLineToFloat(plane.gm + offset, gm, W);
      HalfLineToFloat(plane.gr + offset, gr, W);
      PropagateLine(x, lam, gl, gm, gr, prev, out, W);
    }
    FloatLineToHalf(out, plane.h + offset, W);
    std::swap(prev, out);
  }
}

#if defined(__AVX2__)
// The lines of one strip of a column scan, for lines of at most 8 kVectors positions: the
// previous line stays in registers and its neighbours prev[p - 1], prev[p + 1] are made by lane
// permutes. (Short lines read from memory would load each previous line right after storing it,
// across its vector boundaries, and wait on store forwarding every line.) Same update and edge
// rules as PropagatePaddedLine, without touching the scratch weights. `carry` holds the line
// before the strip (zero padded) and receives its last line.
template <int kVectors>
void ScanShortLines(const float* xs, const float* lams, const float* gls, const float* gms,
                    const float* grs, float* hs, float* carry, int64_t stride, int64_t length,
                    int64_t n, int64_t j0, int64_t width, bool reversed, int64_t chunk) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int32_t last_lane = static_cast<int32_t>((length - 1) % kTile);
  // In the last vector: the lanes of the line, and those with a neighbour below.
  const __m256 in_line =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(last_lane + 1), lanes));
  const __m256 has_below =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(last_lane), lanes));
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
        next[k] = _mm256_mul_ps(_mm256_loadu_ps(lams + offset + k * kTile),
                                _mm256_loadu_ps(xs + offset + k * kTile));
      }
    } else {
      __m256 up[kVectors], down[kVectors];  // lanes rotated by one, fixed up below
      for (int k = 0; k < kVectors; ++k) {
        up[k] = _mm256_permutevar8x32_ps(prev[k], rotate_up);
        down[k] = _mm256_permutevar8x32_ps(prev[k], rotate_down);
      }
      for (int k = 0; k < kVectors; ++k) {
        const __m256 above = _mm256_blend_ps(up[k], k > 0 ? up[k - 1] : zero, 0x01);
        const __m256 below = _mm256_blend_ps(down[k], k + 1 < kVectors ? down[k + 1] : zero, 0x80);
        __m256 gl = _mm256_loadu_ps(gls + offset + k * kTile);
        if (k == 0) gl = _mm256_blend_ps(gl, zero, 0x01);
        __m256 gr = _mm256_loadu_ps(grs + offset + k * kTile);
        if (k == kVectors - 1) gr = _mm256_and_ps(gr, has_below);
        // Ordered for a short dependency chain from prev (the permutes run beside the first FMA).
        __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(lams + offset + k * kTile),
                                   _mm256_loadu_ps(xs + offset + k * kTile));
        sum = _mm256_fmadd_ps(_mm256_loadu_ps(gms + offset + k * kTile), prev[k], sum);
        sum = _mm256_fmadd_ps(gl, above, sum);
        next[k] = _mm256_fmadd_ps(gr, below, sum);
      }
    }
    next[kVectors - 1] = _mm256_and_ps(next[kVectors - 1], in_line);
    for (int k = 0; k < kVectors; ++k) {
      _mm256_storeu_ps(hs + offset + k * kTile, next[k]);
      prev[k] = next[k];
    }
  }
  for (int k = 0; k < kVectors; ++k) _mm256_storeu_ps(carry + k * kTile, prev[k]);
}
#endif

// Column scans: strips of columns are transposed into float32 scratch (see ColumnLayout) so that
// each column (a line of length H) is contiguous, scanned, and transposed back.
template <typename T>
void ColumnScan(const ScanGeometry& g, const Plane<T>& plane, const Plane<T>* next_plane,
                float* scratch) {
  const int64_t H = g.height, W = g.width;
  const ColumnLayout layout = MakeColumnLayout(g);
  const int64_t strip = layout.strip, stride = layout.line_stride, padded = layout.padded;
  float* xs = scratch + kGuard;  // line t of a block at block + t * stride
  float* lams = xs + layout.block;
  float* gls = lams + layout.block;
  float* gms = gls + layout.block;
  float* grs = gms + layout.block;
  float* hs = grs + layout.block;
  float* carry = hs - kGuard + layout.block + kGuard;  // the last line of the previous strip
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
  // Rows of strip k of one tensor, and of the strip after it (of this plane, else the first of
  // the next plane).
  const auto ahead = [&](int64_t k, const T* Plane<T>::*tensor_of, T* Plane<T>::*output) {
    const auto region = [&](const Plane<T>* target, int64_t strip_index) {
      if (target == nullptr) return Region{};
      int64_t j0, n;
      columns(strip_index, &j0, &n);
      const T* base = tensor_of ? target->*tensor_of : target->*output;
      return Region{reinterpret_cast<const char*>(base + j0), W * static_cast<int64_t>(sizeof(T)),
                    n * static_cast<int64_t>(sizeof(T)), H};
    };
    return Ahead{region(&plane, k), k + 1 < strip_count ? region(&plane, k + 1)
                                                        : region(next_plane, 0)};
  };
  for (int64_t k = 0; k < strip_count; ++k) {
    int64_t j0, n;
    columns(k, &j0, &n);
    ToLines(plane.x + j0, W, xs, stride, H, n, ahead(k, &Plane<T>::x, nullptr));
    ToLines(plane.lam + j0, W, lams, stride, H, n, ahead(k, &Plane<T>::lam, nullptr));
    ToLines(plane.gl + j0, W, gls, stride, H, n, ahead(k, &Plane<T>::gl, nullptr));
    ToLines(plane.gm + j0, W, gms, stride, H, n, ahead(k, &Plane<T>::gm, nullptr));
    ToLines(plane.gr + j0, W, grs, stride, H, n, ahead(k, &Plane<T>::gr, nullptr));
#if defined(__AVX2__)
    if (padded <= kMaxShortLine) {
      const auto scan = [&](auto vectors) {
        ScanShortLines<decltype(vectors)::value>(xs, lams, gls, gms, grs, hs, carry, stride, H, n,
                                                 j0, W, reversed, g.chunk);
      };
      switch (padded / kTile) {
        case 1: scan(std::integral_constant<int, 1>()); break;
        case 2: scan(std::integral_constant<int, 2>()); break;
        case 3: scan(std::integral_constant<int, 3>()); break;
        case 4: scan(std::integral_constant<int, 4>()); break;
        case 5: scan(std::integral_constant<int, 5>()); break;
        case 6: scan(std::integral_constant<int, 6>()); break;
        case 7: scan(std::integral_constant<int, 7>()); break;
        default: scan(std::integral_constant<int, 8>()); break;
      }
      FromLines(hs, stride, plane.h + j0, W, n, H, ahead(k, nullptr, &Plane<T>::h));
      continue;
    }
#endif
    const float* prev = carry;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t line = reversed ? n - 1 - t : t;  // column j0 + line
      const int64_t s = reversed ? W - 1 - (j0 + line) : j0 + line;
      const int64_t offset = line * stride;
      if (StartsSegment(s, g.chunk)) {
        StartPaddedLine(xs + offset, lams + offset, hs + offset, H, padded);
      } else {
        gls[offset] = 0.0f;  // no neighbour above the first position
        grs[offset + H - 1] = 0.0f;  // nor below the last
        PropagatePaddedLine(xs + offset, lams + offset, gls + offset, gms + offset, grs + offset,
                            prev, hs + offset, H, padded);
      }
      prev = hs + offset;
    }
    if (k + 1 < strip_count) std::memcpy(carry, prev, static_cast<size_t>(padded) * sizeof(float));
    FromLines(hs, stride, plane.h + j0, W, n, H, ahead(k, nullptr, &Plane<T>::h));
  }
}

// The tensors of plane `index` of a (B, C, H, W) problem.
template <typename T>
Plane<T> PlaneAt(const ScanGeometry& g, int64_t index, const T* x, const T* lam, const T* gl,
                 const T* gm, const T* gr, T* h) {
  const int64_t plane_size = g.height * g.width;
  const int64_t b = index / g.channels;
  const int64_t c = index % g.channels;
  const int64_t group = c / (g.channels / g.groups);
  const int64_t data_offset = index * plane_size;
  const int64_t weight_offset = (b * g.groups + group) * plane_size;
  return {x + data_offset,   lam + data_offset, gl + weight_offset,
          gm + weight_offset, gr + weight_offset, h + data_offset};
}

}  // namespace

size_t ScratchFloats(const ScanGeometry& g, bool half_precision) {
  if (IsRowScan(g.direction)) return half_precision ? static_cast<size_t>(7 * g.width) : 0;
  const ColumnLayout layout = MakeColumnLayout(g);
  return static_cast<size_t>(6 * layout.block + layout.carry);
}

template <typename T>
void ScanPlane(const ScanGeometry& g, int64_t plane_index, const T* x, const T* lam, const T* gl,
               const T* gm, const T* gr, T* h, float* scratch) {
  const Plane<T> plane = PlaneAt(g, plane_index, x, lam, gl, gm, gr, h);
  if (!IsRowScan(g.direction)) {
    // The next plane is the next one this worker scans unless plane_index ends its share.
    const bool has_next = plane_index + 1 < g.batch * g.channels;
    const Plane<T> next = has_next ? PlaneAt(g, plane_index + 1, x, lam, gl, gm, gr, h) : plane;
    ColumnScan(g, plane, has_next ? &next : nullptr, scratch);
  } else if constexpr (std::is_same_v<T, float>) {
    RowScanFloat(g, plane);
  } else {
    RowScanHalf(g, plane, scratch);
  }
}

template void ScanPlane<float>(const ScanGeometry&, int64_t, const float*, const float*,
                               const float*, const float*, const float*, float*, float*);
template void ScanPlane<Half>(const ScanGeometry&, int64_t, const Half*, const Half*, const Half*,
                              const Half*, const Half*, Half*, float*);

}  // namespace gspn

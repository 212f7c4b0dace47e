// CPU kernel of the GSPN scan. See gspn_scan_kernel.h and SPEC.md section 2.
//
// Memory order. Tensors are row-major NCHW. A row scan (t2b, b2t) walks lines that are contiguous
// rows, so each line update is a contiguous, vectorizable loop over the W positions, reading the
// previous line from the output itself (float32) or from a float32 line buffer (float16).
// A column scan (l2r, r2l) walks columns, which are strided in memory. It is processed in strips
// of up to kMaxStripLines adjacent columns: the strip is transposed into a float32 scratch (lines
// become contiguous), scanned with the same vectorized line update, and transposed back. Only the
// last line of a strip is carried to the next one. Scratch is the caller's (see ScratchFloats).
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

constexpr int64_t kMaxStripLines = 16;

// Columns per strip of a column scan: 16 (two 8x8 transpose tiles, and a whole 64-byte cache
// line of each float32 row read; narrower strips read every line twice) unless the six H-long
// float32 strip buffers would exceed kMaxStripScratchBytes (H > 21845), then fewer, at least one.
int64_t StripLines(const ScanGeometry& g) {
  const int64_t per_column = 6 * g.height * static_cast<int64_t>(sizeof(float));
  const int64_t fitting = static_cast<int64_t>(kMaxStripScratchBytes) / per_column;
  return std::max<int64_t>(1, std::min({kMaxStripLines, fitting, g.width}));
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

#if defined(__AVX2__)
// One 8x8 float tile through registers (unpack, shuffle, 128-bit lane permute).
inline void Transpose8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * src_stride);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * dst_stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * dst_stride, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
  }
}
#endif

template <typename Src, typename Dst>
void TransposeBlock(const Src* __restrict__ src, int64_t src_stride, Dst* __restrict__ dst,
                    int64_t dst_stride, int64_t rows, int64_t cols) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Src, float> && std::is_same_v<Dst, float>) {
    const int64_t full_rows = rows - rows % 8, full_cols = cols - cols % 8;
    for (int64_t r = 0; r < full_rows; r += 8) {
      for (int64_t c = 0; c < full_cols; c += 8) {
        Transpose8x8(src + r * src_stride + c, src_stride, dst + c * dst_stride + r, dst_stride);
      }
    }
    // Remainders: the last cols % 8 columns of the full rows, then the last rows % 8 rows.
    TransposeScalar(src + full_cols, src_stride, dst + full_cols * dst_stride, dst_stride,
                    full_rows, cols - full_cols);
    TransposeScalar(src + full_rows * src_stride, src_stride, dst + full_rows, dst_stride,
                    rows - full_rows, cols);
    return;
  }
#endif
  TransposeScalar(src, src_stride, dst, dst_stride, rows, cols);
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

// Column scans: strips of StripLines(g) columns are transposed into float32 scratch so that each
// column (a line of length H) is contiguous.
template <typename T>
void ColumnScan(const ScanGeometry& g, const Plane<T>& plane, float* scratch) {
  const int64_t H = g.height, W = g.width;
  const int64_t strip = StripLines(g);
  const size_t block = static_cast<size_t>(strip * H);
  float* xs = scratch;
  float* lams = xs + block;
  float* gls = lams + block;
  float* gms = gls + block;
  float* grs = gms + block;
  float* hs = grs + block;
  float* carry = hs + block;  // the last line of the previous strip
  const bool reversed = g.direction == Direction::kRightToLeft;
  const int64_t strip_count = (W + strip - 1) / strip;
  for (int64_t k = 0; k < strip_count; ++k) {
    // Strips are visited in scan order; a strip covers columns [j0, j0 + n).
    const int64_t j0 = reversed ? std::max<int64_t>(W - (k + 1) * strip, 0) : k * strip;
    const int64_t n = reversed ? (W - k * strip) - j0 : std::min(strip, W - j0);
    TransposeBlock(plane.x + j0, W, xs, H, H, n);
    TransposeBlock(plane.lam + j0, W, lams, H, H, n);
    TransposeBlock(plane.gl + j0, W, gls, H, H, n);
    TransposeBlock(plane.gm + j0, W, gms, H, H, n);
    TransposeBlock(plane.gr + j0, W, grs, H, H, n);
    const float* prev = carry;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t line = reversed ? n - 1 - t : t;  // column j0 + line
      const int64_t s = reversed ? W - 1 - (j0 + line) : j0 + line;
      const int64_t offset = line * H;
      if (StartsSegment(s, g.chunk)) {
        StartLine(xs + offset, lams + offset, hs + offset, H);
      } else {
        PropagateLine(xs + offset, lams + offset, gls + offset, gms + offset, grs + offset, prev,
                      hs + offset, H);
      }
      prev = hs + offset;
    }
    std::memcpy(carry, prev, static_cast<size_t>(H) * sizeof(float));
    TransposeBlock(hs, H, plane.h + j0, W, n, H);
  }
}

}  // namespace

size_t ScratchFloats(const ScanGeometry& g, bool half_precision) {
  if (IsRowScan(g.direction)) return half_precision ? static_cast<size_t>(7 * g.width) : 0;
  return static_cast<size_t>((6 * StripLines(g) + 1) * g.height);
}

template <typename T>
void ScanPlane(const ScanGeometry& g, int64_t plane_index, const T* x, const T* lam, const T* gl,
               const T* gm, const T* gr, T* h, float* scratch) {
  const int64_t plane_size = g.height * g.width;
  const int64_t b = plane_index / g.channels;
  const int64_t c = plane_index % g.channels;
  const int64_t group = c / (g.channels / g.groups);
  const int64_t data_offset = plane_index * plane_size;
  const int64_t weight_offset = (b * g.groups + group) * plane_size;
  const Plane<T> plane{x + data_offset,   lam + data_offset, gl + weight_offset,
                       gm + weight_offset, gr + weight_offset, h + data_offset};
  if (!IsRowScan(g.direction)) {
    ColumnScan(g, plane, scratch);
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

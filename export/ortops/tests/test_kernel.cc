// Unit tests of the CPU scan and fused-scan kernels (gspn_scan_kernel.cc) without ONNX Runtime. The
// fused scan is checked against a double-precision loop written here (sigmoid, masks, floor,
// naive scan, gate and skip) on odd shapes, every column-scan path, extreme logits and a plane
// beyond 2**31. The scan kernel is checked
// against a naive recurrence written here from SPEC.md section 2, on small and odd shapes, column
// scans through each of their paths (lines of up to 64 positions scanned in registers, longer
// ones through memory; whole-plane and multi-strip layouts; line strides padded against cache-set
// conflicts), non-finite values at the line edges, tall column scans whose strips are narrowed
// by the scratch bound, and planes whose element offset is beyond 2**31 (in sparse,
// never-touched virtual memory).
//
// Built and run by tests/export/test_ortops_cpp.py:
//   g++ -std=c++17 -O2 -I export/ortops export/ortops/tests/test_kernel.cc
//       export/ortops/gspn_scan_kernel.cc -o test_kernel && ./test_kernel
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gspn_scan_kernel.h"

namespace {

using gspn::Direction;
using gspn::Half;
using gspn::ScanGeometry;

int failures = 0;

#define CHECK(condition, ...)                                   \
  do {                                                          \
    if (!(condition)) {                                         \
      ++failures;                                               \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)

const char* Name(Direction d) {
  switch (d) {
    case Direction::kTopToBottom: return "t2b";
    case Direction::kBottomToTop: return "b2t";
    case Direction::kLeftToRight: return "l2r";
    default: return "r2l";
  }
}
const Direction kDirections[] = {Direction::kTopToBottom, Direction::kBottomToTop,
                                 Direction::kLeftToRight, Direction::kRightToLeft};

// binary16 bits -> float, written independently of the kernel's conversions.
float Decode(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  double value;
  if (exponent == 0) {
    value = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    value = mantissa ? NAN : INFINITY;
  } else {
    value = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return static_cast<float>(sign ? -value : value);
}

// A random binary16 value with exponent field in [lo, hi] (so the value is exactly known).
uint16_t RandomHalf(std::mt19937& rng, int lo, int hi, bool allow_negative) {
  const int exponent = std::uniform_int_distribution<int>(lo, hi)(rng);
  const int mantissa = std::uniform_int_distribution<int>(0, 1023)(rng);
  const int sign = allow_negative ? std::uniform_int_distribution<int>(0, 1)(rng) : 0;
  return static_cast<uint16_t>((sign << 15) | (exponent << 10) | mantissa);
}

// Inputs of one (B, C, G, H, W) problem, as binary16 bits and as the floats they hold. Data in
// [-2, 2), weights in [1/32, 1/4) so that every weight row sums below 1 (no overflow in float16).
struct Problem {
  ScanGeometry g;
  std::vector<uint16_t> bits[5];
  std::vector<float> values[5];
};

Problem MakeProblem(int64_t B, int64_t C, int64_t G, int64_t H, int64_t W, Direction d,
                    int64_t chunk, unsigned seed) {
  Problem p;
  p.g.batch = B, p.g.channels = C, p.g.groups = G, p.g.height = H, p.g.width = W;
  p.g.direction = d, p.g.chunk = chunk;
  std::mt19937 rng(seed);
  for (int k = 0; k < 5; ++k) {
    const int64_t count = (k < 2 ? C : G) * B * H * W;
    p.bits[k].resize(count);
    p.values[k].resize(count);
    for (int64_t i = 0; i < count; ++i) {
      p.bits[k][i] = k < 2 ? RandomHalf(rng, 13, 15, true) : RandomHalf(rng, 10, 12, false);
      p.values[k][i] = Decode(p.bits[k][i]);
    }
  }
  return p;
}

// SPEC section 2, one (b, c) plane at a time, in double, straight from the definition.
template <typename V>
std::vector<double> Naive(const ScanGeometry& g, const std::vector<V>* v) {
  const int64_t H = g.height, W = g.width, C = g.channels, G = g.groups;
  const bool rows = g.direction == Direction::kTopToBottom || g.direction == Direction::kBottomToTop;
  const bool reversed = g.direction == Direction::kBottomToTop || g.direction == Direction::kRightToLeft;
  const int64_t lines = rows ? H : W, length = rows ? W : H;
  std::vector<double> h(static_cast<size_t>(g.batch * C * H * W));
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t data = (b * C + c) * H * W, weights = (b * G + c / (C / G)) * H * W;
      auto at = [&](int64_t line, int64_t p) { return rows ? line * W + p : p * W + line; };
      for (int64_t s = 0; s < lines; ++s) {
        const int64_t line = reversed ? lines - 1 - s : s;
        const int64_t previous = reversed ? line + 1 : line - 1;
        const bool restart = s == 0 || (g.chunk > 0 && s % g.chunk == 0);
        for (int64_t p = 0; p < length; ++p) {
          const int64_t i = at(line, p);
          double value = double(v[1][data + i]) * v[0][data + i];
          if (!restart) {
            value += double(v[3][weights + i]) * h[data + at(previous, p)];
            if (p > 0) value += double(v[2][weights + i]) * h[data + at(previous, p - 1)];
            if (p + 1 < length) value += double(v[4][weights + i]) * h[data + at(previous, p + 1)];
          }
          h[data + i] = value;
        }
      }
    }
  }
  return h;
}

// How a test runs the planes of a problem: one ScanPlane call per plane, ScanPlanes over ranges
// of 3 planes (batches cut short at range ends), or one ScanPlanes call over all of them.
enum class Calls { kPerPlane, kRangesOf3, kAllAtOnce };
constexpr Calls kAllCalls[] = {Calls::kPerPlane, Calls::kRangesOf3, Calls::kAllAtOnce};

const char* Name(Calls calls) {
  return calls == Calls::kPerPlane ? "per plane" : calls == Calls::kRangesOf3 ? "ranges of 3" : "all at once";
}

// Calls run(first, count) over the planes [0, total) as `calls` says.
template <typename Run>
void ForPlanes(Calls calls, int64_t total, const Run& run) {
  const int64_t step = calls == Calls::kPerPlane ? 1 : calls == Calls::kRangesOf3 ? 3 : total;
  for (int64_t first = 0; first < total; first += step) run(first, std::min(step, total - first));
}

template <typename T>
std::vector<float> RunKernel(const Problem& p, Calls calls) {
  const T* in[5];
  std::vector<T> storage[5];
  for (int k = 0; k < 5; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      in[k] = p.values[k].data();
    } else {
      storage[k].resize(p.bits[k].size());
      for (size_t i = 0; i < storage[k].size(); ++i) storage[k][i] = Half{p.bits[k][i]};
      in[k] = storage[k].data();
    }
  }
  std::vector<T> h(p.values[0].size());
  std::vector<float> scratch(gspn::ScratchFloats(p.g, std::is_same_v<T, Half>) + 1, NAN);
  ForPlanes(calls, p.g.batch * p.g.channels, [&](int64_t first, int64_t count) {
    if (count == 1) {
      gspn::ScanPlane<T>(p.g, first, in[0], in[1], in[2], in[3], in[4], h.data(), scratch.data());
    } else {
      gspn::ScanPlanes<T>(p.g, first, count, in[0], in[1], in[2], in[3], in[4], h.data(),
                          scratch.data());
    }
  });
  std::vector<float> out(h.size());
  for (size_t i = 0; i < h.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = h[i];
    } else {
      out[i] = Decode(h[i].bits);
    }
  }
  return out;
}

void Compare(const std::vector<float>& actual, const std::vector<double>& expected, double rtol,
             const std::string& what) {
  double scale = 1e-30, worst = 0;
  for (double e : expected) scale = std::max(scale, std::abs(e));
  int64_t bad = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (actual[i] == expected[i]) continue;  // equal infinities included
    const double diff = std::abs(actual[i] - expected[i]);
    if (!(diff <= rtol * (std::abs(expected[i]) + scale))) ++bad;  // NaN counts as bad
    if (diff > worst || std::isnan(diff)) worst = diff;
  }
  CHECK(bad == 0, "%s: %lld of %zu elements differ, max |diff| %.3g, scale %.3g", what.c_str(),
        static_cast<long long>(bad), expected.size(), worst, scale);
}

std::string Describe(const ScanGeometry& g, const char* type) {
  char text[160];
  std::snprintf(text, sizeof(text), "%s (B,C,G,H,W)=(%lld,%lld,%lld,%lld,%lld) %s chunk=%lld",
                type, (long long)g.batch, (long long)g.channels, (long long)g.groups,
                (long long)g.height, (long long)g.width, Name(g.direction), (long long)g.chunk);
  return text;
}

void CheckProblem(const Problem& p) {
  const std::vector<double> expected = Naive(p.g, p.values);
  for (Calls calls : kAllCalls) {
    Compare(RunKernel<float>(p, calls), expected, 1e-5, Describe(p.g, "float32") + ", " + Name(calls));
    Compare(RunKernel<Half>(p, calls), expected, 2e-3, Describe(p.g, "float16") + ", " + Name(calls));
  }
}

void TestSmallShapes() {
  const int64_t shapes[][5] = {{1, 1, 1, 1, 1},  {1, 1, 1, 1, 7},  {1, 1, 1, 7, 1},
                               {2, 4, 2, 5, 6},  {1, 6, 3, 9, 17}, {2, 3, 1, 17, 9},
                               {1, 2, 2, 33, 40}, {1, 1, 1, 3, 100}, {1, 1, 1, 100, 3},
                               {1, 2, 1, 5, 1024}};  // rows 4 KiB apart
  const int64_t chunks[] = {0, 1, 3, 8, int64_t{1} << 40};
  unsigned seed = 1;
  for (const auto& s : shapes) {
    for (Direction d : kDirections) {
      for (int64_t chunk : chunks) {
        CheckProblem(MakeProblem(s[0], s[1], s[2], s[3], s[4], d, chunk, seed++));
      }
    }
  }
}

// Tall column scans: 16 strip columns would need more than kMaxStripScratchBytes, so the strips
// narrow (to 6 columns for H = 50000); the scratch stays within the bound the header states.
void TestTallColumnsAndScratchBound() {
  for (Direction d : {Direction::kLeftToRight, Direction::kRightToLeft}) {
    CheckProblem(MakeProblem(1, 1, 1, 50000, 20, d, 7, 99));
  }
  for (int64_t H : {int64_t{1}, int64_t{56}, int64_t{1000}, int64_t{50000}, int64_t{1} << 22}) {
    for (int64_t W : {int64_t{1}, int64_t{17}, int64_t{1} << 20}) {
      for (Direction d : kDirections) {
        for (bool half : {false, true}) {
          ScanGeometry g;
          g.batch = g.channels = g.groups = 1, g.height = H, g.width = W, g.direction = d;
          const bool rows = d == Direction::kTopToBottom || d == Direction::kBottomToTop;
          const double bytes = 4.0 * static_cast<double>(gspn::ScratchFloats(g, half));
          const double bound =
              rows ? 28.0 * W
                   : std::max(double(gspn::kMaxStripScratchBytes), 24.0 * H + 2048) + 4.0 * H + 128;
          CHECK(bytes <= bound, "%s: scratch %.0f bytes > bound %.0f",
                Describe(g, half ? "float16" : "float32").c_str(), bytes, bound);
        }
      }
    }
  }
}

// Column scans through each path of the kernel: lines (H) of 1 to 64 positions are scanned with
// the previous line in registers, in one to eight vectors; longer lines through memory, with the
// line stride padded where H is a multiple of 128. W from one column to several strips (strips
// of 16 to 24 columns once the plane's transposed lines exceed 32 KiB, of about 64 columns for
// planes taller than ~100: W = 300 is five), with chunk restarts that fall inside and at the
// edges of strips.
void TestColumnScanPaths() {
  const int64_t heights[] = {1, 2, 7, 8, 9, 15, 16, 17, 24, 31, 33, 40, 56, 63, 64,
                             65, 71, 128, 129, 256};
  const int64_t widths[] = {1, 3, 8, 13, 16, 29, 47, 70, 300};
  unsigned seed = 500;
  for (int64_t H : heights) {
    for (int64_t W : widths) {
      for (Direction d : {Direction::kLeftToRight, Direction::kRightToLeft}) {
        const int64_t chunk = (H + W) % 3 == 0 ? 0 : (H + W) % 3 == 1 ? 16 : 5;
        CheckProblem(MakeProblem(1, 2, 1, H, W, d, chunk, seed++));
      }
    }
  }
}

// Out-of-line neighbours contribute zero whatever their weight holds: NaN and infinite weights at
// the first and last position of every line must not reach the output; and an infinite value
// (+inf data with positive weights) spreads through the recurrence as in the definition, without
// turning into NaN through the lines' padding.
void TestNonFiniteEdges() {
  const uint16_t kNaN = 0x7E00, kInf = 0x7C00;
  for (Direction d : kDirections) {
    const bool rows = d == Direction::kTopToBottom || d == Direction::kBottomToTop;
    for (const auto& shape : {std::pair<int64_t, int64_t>{7, 7}, {20, 13}, {70, 9}, {9, 70}}) {
      const int64_t H = shape.first, W = shape.second;
      Problem p = MakeProblem(1, 1, 1, H, W, d, 0, 7000 + static_cast<unsigned>(H));
      const int64_t length = rows ? W : H;
      for (int64_t i = 0; i < H * W; ++i) {
        const int64_t position = rows ? i % W : i / W;  // along the line
        if (position == 0) p.bits[2][i] = kNaN, p.values[2][i] = NAN;  // gl
        if (position == length - 1) p.bits[4][i] = kInf, p.values[4][i] = INFINITY;  // gr
      }
      CheckProblem(p);
      // +inf in x where the scan starts, at the last position of its line; lam > 0 there.
      Problem q = MakeProblem(1, 1, 1, H, W, d, 0, 8000 + static_cast<unsigned>(H));
      const int64_t row = d == Direction::kBottomToTop ? H - 1 : rows ? 0 : H - 1;
      const int64_t col = d == Direction::kRightToLeft ? W - 1 : rows ? W - 1 : 0;
      q.bits[0][row * W + col] = kInf, q.values[0][row * W + col] = INFINITY;
      q.bits[1][row * W + col] = 0x3C00, q.values[1][row * W + col] = 1.0f;
      CheckProblem(q);
    }
  }
}

// Column scans of small planes scan several planes in one line (ScanPlanes): a plane's edge
// neighbours are another plane's values, and must contribute nothing even when they are inf, and
// the edge weights are NaN or inf. Planes of 1 to 32 rows (1 to 16 per line), the
// non-finite values in every third plane, per-channel and grouped weights.
void TestBatchedPlanesIsolated() {
  const uint16_t kNaN = 0x7E00, kInf = 0x7C00;
  for (Direction d : {Direction::kLeftToRight, Direction::kRightToLeft}) {
    for (const auto& shape : {std::array<int64_t, 4>{20, 20, 7, 7}, {11, 11, 14, 9},
                              {12, 4, 28, 28}, {6, 6, 32, 5}, {40, 40, 1, 3}, {18, 6, 3, 17}}) {
      const int64_t C = shape[0], G = shape[1], H = shape[2], W = shape[3];
      Problem p = MakeProblem(1, C, G, H, W, d, 0, 9000 + static_cast<unsigned>(H * C));
      // +inf where the scan of every third plane starts (lam = 1, weights > 0): it spreads over
      // that plane's rows, its edge rows included, beside the next and previous planes.
      const int64_t first_column = d == Direction::kRightToLeft ? W - 1 : 0;
      for (int64_t c = 0; c < C; c += 3) {
        const int64_t i = c * H * W + first_column;
        p.bits[0][i] = kInf, p.values[0][i] = INFINITY;
        p.bits[1][i] = 0x3C00, p.values[1][i] = 1.0f;
      }
      for (int64_t i = 0; i < G * H * W; ++i) {  // weights reaching out of the plane
        const int64_t row = (i / W) % H;
        if (row == 0) p.bits[2][i] = kNaN, p.values[2][i] = NAN;  // gl
        if (row == H - 1) p.bits[4][i] = kInf, p.values[4][i] = INFINITY;  // gr
      }
      CheckProblem(p);
    }
  }
}

// One plane at element offset >= 2**31 in (B, C, H, W) = (1, 2**15 + 1, 256, 256) tensors. The
// tensors are reserved, not allocated (MAP_NORESERVE: only the pages of the planes used are ever
// touched), so this needs a few hundred kilobytes of memory.
template <typename T>
T* Reserve(size_t count) {
  void* memory = mmap(nullptr, count * sizeof(T), PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    std::perror("mmap");
    std::exit(2);
  }
  return static_cast<T*>(memory);
}

template <typename T>
void TestOffsetsBeyond2To31() {
  const int64_t C = (int64_t{1} << 15) + 1, H = 256, W = 256, plane = H * W;
  const size_t total = static_cast<size_t>(C * plane);  // 2**31 + 2**16 elements
  Problem small = MakeProblem(1, 1, 1, H, W, Direction::kTopToBottom, 0, 7);
  T* data[2] = {Reserve<T>(total), Reserve<T>(total)};
  T* h = Reserve<T>(total);
  std::vector<T> weights[3];
  const int64_t last = C - 1;  // element offset last * plane = 2**31
  for (int k = 0; k < 5; ++k) {
    for (int64_t i = 0; i < plane; ++i) {
      T value;
      if constexpr (std::is_same_v<T, float>) {
        value = small.values[k][i];
      } else {
        value = Half{small.bits[k][i]};
      }
      if (k < 2) {
        data[k][last * plane + i] = value;
      } else {
        weights[k - 2].push_back(value);
      }
    }
  }
  for (Direction d : kDirections) {
    small.g.direction = d;
    ScanGeometry g = small.g;
    g.channels = C;
    std::vector<float> scratch(gspn::ScratchFloats(g, std::is_same_v<T, Half>) + 1);
    gspn::ScanPlane<T>(g, last, data[0], data[1], weights[0].data(), weights[1].data(),
                       weights[2].data(), h, scratch.data());
    std::vector<float> actual(static_cast<size_t>(plane));
    for (int64_t i = 0; i < plane; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        actual[i] = h[last * plane + i];
      } else {
        actual[i] = Decode(h[last * plane + i].bits);
      }
    }
    const std::string what = std::string("plane at offset 2**31, ") +
                             Describe(g, std::is_same_v<T, float> ? "float32" : "float16");
    Compare(actual, Naive(small.g, small.values), std::is_same_v<T, float> ? 1e-5 : 2e-3, what);
    // Nothing may have been written at the 32-bit wrapped offset (plane 0).
    bool plane0_untouched = true;
    for (int64_t i = 0; i < plane; ++i) {
      T zero{};
      plane0_untouched &= std::memcmp(&h[i], &zero, sizeof(T)) == 0;
    }
    CHECK(plane0_untouched, "%s: plane 0 was written", what.c_str());
  }
  for (T* memory : {data[0], data[1], h}) munmap(memory, total * sizeof(T));
}

// ---- the fused scan --------------------------------------------------------------------------

// Inputs u, lam, al, am, ar, gate, skip of one fused problem: data in [-2, 2), logits of either
// sign with magnitudes from 1/32 to 16 (saturating the sigmoid), as binary16 bits and floats.
struct FusedProblem {
  ScanGeometry g;
  std::vector<uint16_t> bits[7];
  std::vector<float> values[7];
};

bool IsLogit(int k) { return k >= 2 && k <= 4; }

FusedProblem MakeFusedProblem(int64_t B, int64_t C, int64_t G, int64_t H, int64_t W, Direction d,
                              int64_t chunk, unsigned seed) {
  FusedProblem p;
  p.g.batch = B, p.g.channels = C, p.g.groups = G, p.g.height = H, p.g.width = W;
  p.g.direction = d, p.g.chunk = chunk;
  std::mt19937 rng(seed);
  for (int k = 0; k < 7; ++k) {
    const int64_t count = (IsLogit(k) ? G : C) * B * H * W;
    p.bits[k].resize(count);
    p.values[k].resize(count);
    for (int64_t i = 0; i < count; ++i) {
      p.bits[k][i] = IsLogit(k) ? RandomHalf(rng, 10, 18, true) : RandomHalf(rng, 13, 15, true);
      p.values[k][i] = Decode(p.bits[k][i]);
    }
  }
  return p;
}

void SetValue(FusedProblem* p, int k, int64_t i, uint16_t bits) {
  p->bits[k][i] = bits;
  p->values[k][i] = Decode(bits);
}

// docs/operator.md "The fused scan", in double: weights normalized from the logits, the naive
// scan, then y = h gate + u skip.
std::vector<double> NaiveFused(const FusedProblem& p) {
  const ScanGeometry& g = p.g;
  const int64_t H = g.height, W = g.width;
  const bool rows = g.direction == Direction::kTopToBottom || g.direction == Direction::kBottomToTop;
  const int64_t length = rows ? W : H;
  std::vector<double> v[5];
  for (int k : {0, 1}) v[k].assign(p.values[k].begin(), p.values[k].end());
  const size_t weights = p.values[2].size();
  for (int k = 2; k < 5; ++k) v[k].resize(weights);
  const auto sigmoid = [](double a) { return 1.0 / (1.0 + std::exp(-a)); };
  for (size_t i = 0; i < weights; ++i) {
    const int64_t position = rows ? static_cast<int64_t>(i) % W : static_cast<int64_t>(i) / W % H;
    const double s_l = position > 0 ? sigmoid(p.values[2][i]) : 0.0;
    const double s_m = sigmoid(p.values[3][i]);
    const double s_r = position < length - 1 ? sigmoid(p.values[4][i]) : 0.0;
    const double total = std::max(s_l + s_m + s_r, 1e-7);
    v[2][i] = s_l / total, v[3][i] = s_m / total, v[4][i] = s_r / total;
  }
  std::vector<double> y = Naive(g, v);
  for (size_t i = 0; i < y.size(); ++i) {
    y[i] = y[i] * p.values[5][i] + double(p.values[0][i]) * p.values[6][i];
  }
  return y;
}

template <typename T>
std::vector<float> RunFused(const FusedProblem& p, Calls calls) {
  std::vector<T> storage[7];
  for (int k = 0; k < 7; ++k) {
    storage[k].resize(p.bits[k].size());
    for (size_t i = 0; i < storage[k].size(); ++i) {
      if constexpr (std::is_same_v<T, float>) {
        storage[k][i] = p.values[k][i];
      } else {
        storage[k][i] = Half{p.bits[k][i]};
      }
    }
  }
  std::vector<T> y(p.values[0].size());
  std::vector<float> scratch(gspn::FusedScratchFloats(p.g, std::is_same_v<T, Half>) + 1, NAN);
  ForPlanes(calls, p.g.batch * p.g.channels, [&](int64_t first, int64_t count) {
    if (count == 1) {
      gspn::FusedScanPlane<T>(p.g, first, storage[0].data(), storage[1].data(), storage[2].data(),
                              storage[3].data(), storage[4].data(), storage[5].data(),
                              storage[6].data(), y.data(), scratch.data());
    } else {
      gspn::FusedScanPlanes<T>(p.g, first, count, storage[0].data(), storage[1].data(),
                               storage[2].data(), storage[3].data(), storage[4].data(),
                               storage[5].data(), storage[6].data(), y.data(), scratch.data());
    }
  });
  std::vector<float> out(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = y[i];
    } else {
      out[i] = Decode(y[i].bits);
    }
  }
  return out;
}

void CheckFused(const FusedProblem& p) {
  const std::vector<double> expected = NaiveFused(p);
  for (Calls calls : kAllCalls) {
    Compare(RunFused<float>(p, calls), expected, 1e-5,
            "fused " + Describe(p.g, "float32") + ", " + Name(calls));
    Compare(RunFused<Half>(p, calls), expected, 2e-3,
            "fused " + Describe(p.g, "float16") + ", " + Name(calls));
  }
}

// Small and odd shapes, one-wide maps, groups, chunks, every direction.
void TestFusedShapes() {
  const int64_t shapes[][5] = {{1, 1, 1, 1, 1},  {1, 1, 1, 1, 7},  {1, 1, 1, 7, 1},
                               {2, 4, 2, 5, 6},  {1, 6, 3, 9, 17}, {2, 3, 1, 17, 9},
                               {1, 2, 2, 33, 40}, {1, 1, 1, 3, 100}, {1, 1, 1, 100, 3},
                               {1, 2, 1, 5, 1024}};  // rows 4 KiB apart
  unsigned seed = 20000;
  for (const auto& s : shapes) {
    for (Direction d : kDirections) {
      for (int64_t chunk : {int64_t{0}, int64_t{1}, int64_t{3}}) {
        CheckFused(MakeFusedProblem(s[0], s[1], s[2], s[3], s[4], d, chunk, seed++));
      }
    }
  }
}

// Column scans through each path (lines in registers up to 64 positions, through memory beyond;
// one or several strips), the normalization done in the transposed blocks.
void TestFusedColumnPaths() {
  unsigned seed = 21000;
  for (int64_t H : {1, 7, 8, 9, 33, 64, 65, 129}) {
    for (int64_t W : {1, 13, 47}) {
      for (Direction d : {Direction::kLeftToRight, Direction::kRightToLeft}) {
        CheckFused(MakeFusedProblem(1, 2, 1, H, W, d, (H + W) % 2 ? 0 : 5, seed++));
      }
    }
  }
}

// Saturated and extreme logits: +-30, +-100 and +-inf, and positions where all three logits are
// so negative that the sum of the sigmoids falls under the 1e-7 floor.
void TestFusedExtremeLogits() {
  const uint16_t kExtremes[] = {0x4F80, 0xCF80, 0x5640, 0xD640, 0x7C00, 0xFC00};  // 30 100 inf
  unsigned seed = 22000;
  for (Direction d : kDirections) {
    FusedProblem p = MakeFusedProblem(1, 2, 1, 9, 20, d, 0, seed++);
    std::mt19937 rng(seed);
    for (int k = 2; k < 5; ++k) {
      for (size_t i = 0; i < p.bits[k].size(); ++i) {
        if (rng() % 3 == 0) SetValue(&p, k, i, kExtremes[rng() % 6]);
      }
    }
    for (size_t i = 0; i < p.bits[2].size(); i += 7) {
      for (int k = 2; k < 5; ++k) SetValue(&p, k, i, 0xCF80);  // all three -30
    }
    CheckFused(p);
  }
}

// One plane at element offset 2**31 of (1, 2**15 + 1, 256, 256) tensors (reserved, not
// allocated; see TestOffsetsBeyond2To31), in every direction.
template <typename T>
void TestFusedOffsetsBeyond2To31() {
  const int64_t C = (int64_t{1} << 15) + 1, H = 256, W = 256, plane = H * W, last = C - 1;
  const size_t total = static_cast<size_t>(C * plane);
  FusedProblem small = MakeFusedProblem(1, 1, 1, H, W, Direction::kTopToBottom, 0, 23000);
  T* data[4] = {Reserve<T>(total), Reserve<T>(total), Reserve<T>(total), Reserve<T>(total)};
  T* y = Reserve<T>(total);
  const int kDataSlots[4] = {0, 1, 5, 6};
  std::vector<T> logits[3];
  for (int k = 0; k < 7; ++k) {
    for (int64_t i = 0; i < plane; ++i) {
      T value;
      if constexpr (std::is_same_v<T, float>) {
        value = small.values[k][i];
      } else {
        value = Half{small.bits[k][i]};
      }
      if (IsLogit(k)) {
        logits[k - 2].push_back(value);
      } else {
        data[std::find(kDataSlots, kDataSlots + 4, k) - kDataSlots][last * plane + i] = value;
      }
    }
  }
  for (Direction d : kDirections) {
    small.g.direction = d;
    ScanGeometry g = small.g;
    g.channels = C;
    std::vector<float> scratch(gspn::FusedScratchFloats(g, std::is_same_v<T, Half>) + 1);
    gspn::FusedScanPlane<T>(g, last, data[0], data[1], logits[0].data(), logits[1].data(),
                            logits[2].data(), data[2], data[3], y, scratch.data());
    std::vector<float> actual(static_cast<size_t>(plane));
    bool plane0_untouched = true;
    for (int64_t i = 0; i < plane; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        actual[i] = y[last * plane + i];
      } else {
        actual[i] = Decode(y[last * plane + i].bits);
      }
      T zero{};
      plane0_untouched &= std::memcmp(&y[i], &zero, sizeof(T)) == 0;
    }
    const std::string what = std::string("fused plane at offset 2**31, ") +
                             Describe(g, std::is_same_v<T, float> ? "float32" : "float16");
    Compare(actual, NaiveFused(small), std::is_same_v<T, float> ? 1e-5 : 2e-3, what);
    CHECK(plane0_untouched, "%s: plane 0 was written", what.c_str());
  }
  for (T* memory : {data[0], data[1], data[2], data[3], y}) munmap(memory, total * sizeof(T));
}

// The fused scan's scratch: that of the scan for column scans, 10 W floats for row scans, and for
// float32 planes of rows under 32 wide with at most 1024 positions (scanned as one range) at least
// 6 H W floats (two edge masks, three weights, h).
void TestFusedScratch() {
  for (int64_t H : {int64_t{1}, int64_t{7}, int64_t{56}, int64_t{50000}}) {
    for (int64_t W : {int64_t{1}, int64_t{17}, int64_t{31}, int64_t{32}, int64_t{1} << 20}) {
      for (Direction d : kDirections) {
        for (bool half : {false, true}) {
          ScanGeometry g;
          g.batch = g.channels = g.groups = 1, g.height = H, g.width = W, g.direction = d;
          const bool rows = d == Direction::kTopToBottom || d == Direction::kBottomToTop;
          const bool plane_path = rows && !half && W < 32 && H * W <= 1024;
          const size_t expected = !rows ? gspn::ScratchFloats(g, half)
                                  : plane_path ? static_cast<size_t>(std::max(10 * W, 6 * H * W))
                                               : static_cast<size_t>(10 * W);
          CHECK(gspn::FusedScratchFloats(g, half) == expected, "%s: fused scratch %zu, expected %zu",
                Describe(g, half ? "float16" : "float32").c_str(), gspn::FusedScratchFloats(g, half),
                expected);
        }
      }
    }
  }
}

void TestParseDirection() {
  Direction d = Direction::kTopToBottom;
  CHECK(gspn::ParseDirection("r2l", 3, &d) && d == Direction::kRightToLeft, "r2l");
  CHECK(gspn::ParseDirection("b2t", 3, &d) && d == Direction::kBottomToTop, "b2t");
  CHECK(!gspn::ParseDirection("t2b\0junk", 8, &d), "t2b\\0junk accepted");
  CHECK(!gspn::ParseDirection("t2b", 4, &d), "t2b with its NUL accepted");
  CHECK(!gspn::ParseDirection("T2B", 3, &d), "T2B accepted");
  CHECK(!gspn::ParseDirection("", 0, &d), "empty accepted");
  CHECK(!gspn::ParseDirection(nullptr, 3, &d), "null accepted");
}

}  // namespace

int main() {
  TestParseDirection();
  TestSmallShapes();
  TestColumnScanPaths();
  TestNonFiniteEdges();
  TestBatchedPlanesIsolated();
  TestTallColumnsAndScratchBound();
  TestOffsetsBeyond2To31<float>();
  TestOffsetsBeyond2To31<Half>();
  TestFusedShapes();
  TestFusedColumnPaths();
  TestFusedExtremeLogits();
  TestFusedScratch();
  TestFusedOffsetsBeyond2To31<float>();
  TestFusedOffsetsBeyond2To31<Half>();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel checks passed\n");
  return 0;
}

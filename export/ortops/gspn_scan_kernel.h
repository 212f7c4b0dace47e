// CPU kernels of the GSPN scan (SPEC.md section 2) and of the fused scan (docs/operator.md, "The
// fused scan"), independent of ONNX Runtime.
//
// The caller validates shapes; this code assumes a consistent ScanGeometry (every size >= 1,
// G divides C).
#pragma once

#include <cstddef>
#include <cstdint>

namespace gspn {

enum class Direction { kTopToBottom, kBottomToTop, kLeftToRight, kRightToLeft };

// Parses exactly "t2b", "b2t", "l2r", "r2l" (length-checked: "t2b\0junk" is not "t2b");
// returns false for anything else.
bool ParseDirection(const char* name, size_t length, Direction* direction);

struct ScanGeometry {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t groups = 0;    // G, divides C
  int64_t height = 0;    // H
  int64_t width = 0;     // W
  Direction direction = Direction::kTopToBottom;
  int64_t chunk = 0;  // 0: global propagation; k > 0: restart at every k-th scanned line
};

// IEEE binary16 stored as its bit pattern.
struct Half {
  uint16_t bits;
};

// Float32 scratch (in elements) that ScanPlane needs for planes of `geometry`: 0 for float32 row
// scans, 7 W for float16 row scans; for column scans five blocks of S transposed, zero-padded
// lines of about H floats (P H for P planes scanned together, see ScanPlanes: P H <= 64) and one
// carried line, about (5 S + 1) H, where the strip width S (1 to W
// columns) keeps the five blocks within kMaxStripScratchBytes unless one column alone needs more.
// So a worker never needs more than max(kMaxStripScratchBytes, 24 H + 2048) + 4 H + 128 bytes for
// a column scan, 28 W bytes for a float16 row scan, whatever B and C are.
constexpr size_t kMaxStripScratchBytes = size_t{8} << 20;
size_t ScratchFloats(const ScanGeometry& geometry, bool half_precision);

// Computes the scan of one (b, c) plane, `plane` in [0, B*C). x, lam, h: (B, C, H, W);
// gl, gm, gr: (B, G, H, W), all dense row-major; offsets are computed in 64 bits. Accumulates in
// float32. `scratch` holds at least ScratchFloats(geometry, T is Half) floats, owned by the
// caller (the kernel keeps no memory between calls).
template <typename T>
void ScanPlane(const ScanGeometry& geometry, int64_t plane, const T* x, const T* lam,
               const T* gl, const T* gm, const T* gr, T* h, float* scratch);

// Planes [first, first + count) of the scan, as ScanPlane on each, with the same scratch. Column
// scans of small planes (H <= 32 with AVX2) scan several planes together, their columns end to
// end in one line; the planes just past the range are prefetched, never written.
template <typename T>
void ScanPlanes(const ScanGeometry& geometry, int64_t first, int64_t count, const T* x,
                const T* lam, const T* gl, const T* gm, const T* gr, T* h, float* scratch);

// The fused scan of one (b, c) plane, `plane` in [0, B*C):
//   y = ScanPlane(u, lam, normalize(al, am, ar)) * gate + u * skip
// with normalize: s_k = sigmoid(a_k), s_l = 0 at the first position of a line and s_r = 0 at the
// last, g_k = s_k / max(s_l + s_m + s_r, 1e-7). u, lam, gate, skip, y: (B, C, H, W); al, am, ar:
// (B, G, H, W) raw logits. Weights and h are float32 and never rounded to T; y is rounded once.
// `scratch` holds at least FusedScratchFloats(geometry, T is Half) floats: that of ScanPlane for
// column scans (the logits are normalized in place in its transposed blocks), 10 W for row scans
// (line buffers for h and the weights).
size_t FusedScratchFloats(const ScanGeometry& geometry, bool half_precision);

template <typename T>
void FusedScanPlane(const ScanGeometry& geometry, int64_t plane, const T* u, const T* lam,
                    const T* al, const T* am, const T* ar, const T* gate, const T* skip, T* y,
                    float* scratch);

// Planes [first, first + count) of the fused scan, as FusedScanPlane on each (see ScanPlanes).
template <typename T>
void FusedScanPlanes(const ScanGeometry& geometry, int64_t first, int64_t count, const T* u,
                     const T* lam, const T* al, const T* am, const T* ar, const T* gate,
                     const T* skip, T* y, float* scratch);

}  // namespace gspn

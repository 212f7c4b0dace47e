// CPU kernel of the GSPN scan (SPEC.md section 2), independent of ONNX Runtime.
//
// The caller validates shapes; this code assumes a consistent ScanGeometry.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gspn {

enum class Direction { kTopToBottom, kBottomToTop, kLeftToRight, kRightToLeft };

// Parses "t2b", "b2t", "l2r", "r2l"; returns false for anything else.
bool ParseDirection(const char* name, Direction* direction);

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

// Computes the scan of one (b, c) plane, `plane` in [0, B*C). x, lam, h: (B, C, H, W);
// gl, gm, gr: (B, G, H, W), all dense row-major. Accumulates in float32.
// Returns false only when scratch memory could not be allocated.
template <typename T>
bool ScanPlane(const ScanGeometry& geometry, int64_t plane, const T* x, const T* lam,
               const T* gl, const T* gm, const T* gr, T* h);

}  // namespace gspn

// sparselm masked-bitmap kernels (CPU). Original code written for sparselm.
//
// A "masked matrix" (rows, cols) is stored as a packed bitmask (bit r*cols+c, little-endian bits in
// bytes) plus its nonzero values in row-major order; `offsets` (rows+1, int64) is the popcount prefix,
// i.e. the index of row r's first value. Value kinds: 0 bf16, 1 fp16, 2 fp32, 3 int8 (times a per-row
// scale), 4 bf16 packed in 14 bits (the saved `values14` buffer, decoded in registers), 5 int8 times an fp16
// scale per group of `group` columns of a row, 6 int4 (two per byte, low nibble first) as (code - zero) ·
// scale with an fp16 scale and a 4-bit zero point per group (group 0: one group per row).
// An empty mask means every entry is kept: the dense factors of an encoded (14-bit, int8, int4) storage.
// `block` > 0: the mask has one bit per 1×block block of a row (GQSA), kept blocks' values stored whole, one
// quantization group per kept block (the group index counts the kept blocks before it).
//
//   masked_gemv(x (T, cols), ..., bias)     -> (T, rows) x's dtype   Y = X Mᵀ + b, decode (T small)
//   dense_gemv(x (T, cols) bf16, W, bias)   -> (T, rows) bf16        Y = X Wᵀ + b, dense factors at decode
//   dense_dense_mm(x, A, W, bias, panels)   -> (..., rows) x's dtype  Y = (X Aᵀ) Wᵀ + b, dense factors at prefill
//   (these and the panel products also take x (..., cols) and give (..., rows): `tokens_of`, `shaped_like`)
//   masked_unpack(..., r0, r1, out (r1-r0, cols) bf16|f16|f32)   dense rows of M, for prefill panels
//
// Each has three paths, chosen at run time: AVX-512 (VBMI2 expand-load of the values under 32 mask bits at a
// time, fp32 FMA or VDPBF16PS: bf16 x meets bf16 / 14-bit values, and int4 codes through a bf16 table), AVX2 +
// FMA + F16C (8 mask bits at a time: a 256-entry table per 8 bits spreads the next popcount values over their
// columns, VPSHUFB straight to fp32 bits for bf16, VPERMPS indices + a blend for the other kinds once decoded;
// dense bf16 rows widened to fp32 by shifts) and a portable scalar loop.
// The caller passes `isa`, the highest level allowed (SPARSELM_ISA, read on the Python side): 2 AVX-512, 1 AVX2,
// 0 scalar. gemv_level / dense_level say which runs: the best the CPU has at or below the cap, and for the
// grouped int8 / int4 kinds one whose chunk (32 columns for AVX-512, 8 for AVX2) lies in one group. dense_gemv
// has no scalar loop (level 0: the caller takes F.linear).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <cstring>
#include <type_traits>

namespace {

enum Kind { BF16 = 0, FP16 = 1, FP32 = 2, INT8 = 3, P14 = 4, INT8G = 5, INT4 = 6 };

struct Masked {
  const uint8_t* mask; int64_t mask_bytes;  // nullptr: every entry kept (a dense encoded factor)
  const int64_t* offsets;
  const void* values; int64_t value_bytes; int kind;
  const float* scale;  // (rows,) for INT8, else nullptr
  int64_t rows, cols;
  const c10::Half* gscale = nullptr;  // INT8G / INT4: one scale per group, row-major (rows, groups per row)
  const uint8_t* zero = nullptr;      // INT4: 4-bit zero points, packed as the groups
  int64_t group = 0, gpr = 1;         // columns per group (0: the whole row) and groups per row
  int64_t block = 0;                  // 1×block blocks (GQSA): `mask` holds one bit per block, (rows, gpr) with
                                      // gpr blocks per row; grouped values have one group per kept block
  int block_shift = -1;               // log2(block) when it is a power of two
};

// set bits a..b-1 of a packed bitmask
inline int64_t ones_between(const uint8_t* p, int64_t a, int64_t b) {
  int64_t n = 0;
  for (; a < b && (a & 7); a++) n += (p[a >> 3] >> (a & 7)) & 1;
  for (; a + 8 <= b; a += 8) n += __builtin_popcount(p[a >> 3]);
  for (; a < b; a++) n += (p[a >> 3] >> (a & 7)) & 1;
  return n;
}

inline bool block_kept(const Masked& m, int64_t r, int64_t b) {
  const int64_t i = r * m.gpr + b;
  return (m.mask[i >> 3] >> (i & 7)) & 1;
}

inline bool grouped(int kind) { return kind == INT8G || kind == INT4; }

// f(std::integral_constant<int, K>()) for the run-time value kind: the one place a kind becomes a template constant
template <typename F> inline void with_kind(int kind, F&& f) {
  switch (kind) {
    case BF16: f(std::integral_constant<int, BF16>()); break;
    case FP16: f(std::integral_constant<int, FP16>()); break;
    case FP32: f(std::integral_constant<int, FP32>()); break;
    case INT8: f(std::integral_constant<int, INT8>()); break;
    case P14: f(std::integral_constant<int, P14>()); break;
    case INT8G: f(std::integral_constant<int, INT8G>()); break;
    default: f(std::integral_constant<int, INT4>());
  }
}

// scale and zero point of group number g
__attribute__((always_inline)) inline void params_of(const Masked& m, int64_t g, float& s, float& z) {
  s = float(m.gscale[g]);
  z = m.zero ? float((m.zero[g >> 1] >> (4 * (g & 1))) & 0xF) : 0.f;
}

// params_of for the SIMD loops (every one of them has F16C): the scale through VCVTPH2PS. c10::Half's conversion,
// which params_of must use in the scalar loop, is a portable bit routine unless the whole build has -mf16c: it made
// the GQSA g16 block GEMV 26 % slower, the masked int4/g16 one 5-17 %.
__attribute__((target("f16c"), always_inline)) inline void params_of_f16c(const Masked& m, int64_t g, float& s,
                                                                          float& z) {
  s = _cvtsh_ss(m.gscale[g].x);
  z = m.zero ? float((m.zero[g >> 1] >> (4 * (g & 1))) & 0xF) : 0.f;
}

// blocks: the parameters of block b of row r, kept block number `index` overall (the kept blocks before it: earlier
// rows' = offsets[r] / block, and row r's left of b); a pruned block has no parameters (none of its values is read)
// (no branch: a random block mask would mispredict half of them; a pruned block reads group 0's parameters,
// which exist, since a cursor is only asked inside a row with a kept block, and then zeroes them)
__attribute__((always_inline)) inline void block_params(const Masked& m, int64_t r, int64_t b, int64_t index,
                                                        float& s, float& z) {
  const bool kept = block_kept(m, r, b);
  params_of(m, kept ? index : 0, s, z);
  s = kept ? s : 0.f;
  z = kept ? z : 0.f;
}

// scale and zero point of the group holding (r, col)
__attribute__((always_inline)) inline void group_params(const Masked& m, int64_t r, int64_t col, float& s, float& z) {
  if (m.block) {
    const int64_t b = col / m.block;
    block_params(m, r, b, m.offsets[r] / m.block + ones_between(m.mask, r * m.gpr, r * m.gpr + b), s, z);
    return;
  }
  params_of(m, r * m.gpr + (m.group ? col / m.group : 0), s, z);
}

// the 64 mask bits from bit pos, never reading past the buffer (there the missing bits are 0)
inline uint64_t bits64(const Masked& m, int64_t pos) {
  const int64_t byte = pos >> 3;
  const int sh = int(pos & 7);
  uint64_t bits = 0;
  if (byte + 9 <= m.mask_bytes) {
    std::memcpy(&bits, m.mask + byte, 8);
    bits >>= sh;
    if (sh) bits |= uint64_t(m.mask[byte + 8]) << (64 - sh);
    return bits;
  }
  for (int64_t i = 0; byte + i < m.mask_bytes && i < 9; i++) {
    const int s = 8 * int(i) - sh;
    const uint64_t v = m.mask[byte + i];
    bits |= s >= 0 ? (s < 64 ? v << s : 0) : v >> -s;
  }
  return bits;
}

// the n (<= 32) mask bits of row r from column c0 (bit r·cols + c0), never reading past the buffer; all set
// without a mask. Blocks: each block's bit for each of its columns (no branch, and no division for the
// power-of-two widths: one per chunk cost more than the chunk's arithmetic).
inline uint32_t read_bits(const Masked& m, int64_t r, int64_t c0, int n) {
  if (!m.mask) return n == 32 ? ~0u : uint32_t((1ull << n) - 1);
  if (m.block) {
    uint32_t w = 0;
    for (int64_t c = c0; c < c0 + n;) {
      const int64_t b = m.block_shift >= 0 ? c >> m.block_shift : c / m.block;
      const int64_t end = std::min((b + 1) * m.block, c0 + n);
      w |= uint32_t(-uint64_t(block_kept(m, r, b)) & (((1ull << (end - c)) - 1) << (c - c0)));  // no branch
      c = end;
    }
    return w;
  }
  const uint64_t w = bits64(m, r * m.cols + c0);
  return n == 32 ? uint32_t(w) : uint32_t(w & ((1ull << n) - 1));
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f;
}

// value number i (no int8 scale applied)
inline float value_at(const Masked& m, int64_t i) {
  switch (m.kind) {
    case BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(m.values)[i]);
    case FP16: return float(static_cast<const c10::Half*>(m.values)[i]);
    case FP32: return static_cast<const float*>(m.values)[i];
    case INT8: case INT8G: return float(static_cast<const int8_t*>(m.values)[i]);
    case INT4: return float((static_cast<const uint8_t*>(m.values)[i >> 1] >> (4 * (i & 1))) & 0xF);
    default: {  // P14: 14 bits at bit 14*i; the top bit is the sign, bf16 bits = v << 2
      const uint8_t* p = static_cast<const uint8_t*>(m.values);
      int64_t pos = 14 * i, byte = pos >> 3; int sh = int(pos & 7);
      uint32_t w = 0;
      for (int k = 0; k < 3 && byte + k < m.value_bytes; k++) w |= uint32_t(p[byte + k]) << (8 * k);
      return bf16_bits_to_float(uint16_t(((w >> sh) & 0x3FFF) << 2));
    }
  }
}

// ---- scalar ------------------------------------------------------------------------------------
void gemv_rows_scalar(const Masked& m, const float* x, int64_t T, float* acc, int64_t r) {
  std::fill(acc, acc + T, 0.f);
  int64_t idx = m.offsets[r];
  for (int64_t c = 0; c < m.cols; c += 32) {
    int n = int(std::min<int64_t>(32, m.cols - c));
    for (uint32_t w = read_bits(m, r, c, n); w; w &= w - 1) {
      int64_t col = c + __builtin_ctz(w);
      float v = value_at(m, idx++);
      if (grouped(m.kind)) { float s, z; group_params(m, r, col, s, z); v = (v - z) * s; }
      for (int64_t t = 0; t < T; t++) acc[t] += v * x[t * m.cols + col];
    }
  }
}

template <typename OutT>
void unpack_rows_scalar(const Masked& m, int64_t r0, int64_t r1, OutT* out) {
  for (int64_t r = r0; r < r1; r++) {
    OutT* o = out + r * m.cols;
    std::fill(o, o + m.cols, OutT(0.f));
    int64_t idx = m.offsets[r];
    float s = m.scale ? m.scale[r] : 1.f;
    for (int64_t c = 0; c < m.cols; c += 32) {
      int n = int(std::min<int64_t>(32, m.cols - c));
      for (uint32_t w = read_bits(m, r, c, n); w; w &= w - 1) {
        const int64_t col = c + __builtin_ctz(w);
        float v = value_at(m, idx++) * s;
        if (grouped(m.kind)) { float gs, z; group_params(m, r, col, gs, z); v = (v - z) * gs; }
        o[col] = OutT(v);
      }
    }
  }
}

// ---- AVX-512 ------------------------------------------------------------------------------------
#define SPARSELM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,f16c,fma,popcnt")))

SPARSELM_AVX512 inline __m512 bf16x16_to_ps(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// byte tables for the in-register 14-bit decode (see p14_load32)
struct Bytes64 { uint8_t b[64]; };
constexpr Bytes64 p14_perm() {  // qword q = bytes 7q..7q+7 of the loaded chunk (values 4q..4q+3)
  Bytes64 t{};
  for (int q = 0; q < 8; q++) for (int k = 0; k < 8; k++) t.b[8 * q + k] = uint8_t(7 * q + k);
  return t;
}
constexpr Bytes64 p14_ctrl(int o) {  // 16-bit lane 4q+t: the bits at 2o+14t of qword q
  Bytes64 t{};
  for (int q = 0; q < 8; q++) for (int k = 0; k < 4; k++) {
    t.b[8 * q + 2 * k] = uint8_t(2 * o + 14 * k); t.b[8 * q + 2 * k + 1] = uint8_t(2 * o + 14 * k + 8);
  }
  return t;
}
alignas(64) constexpr Bytes64 kP14Perm = p14_perm();
constexpr Bytes64 next_byte() { Bytes64 t{}; for (int i = 0; i < 64; i++) t.b[i] = uint8_t(i < 63 ? i + 1 : 63); return t; }
alignas(64) constexpr Bytes64 kNextByte = next_byte();  // byte i <- byte i+1 (an odd first nibble)
alignas(64) constexpr Bytes64 kP14Ctrl[4] = {p14_ctrl(0), p14_ctrl(1), p14_ctrl(2), p14_ctrl(3)};

// 32 consecutive 14-bit values starting at value index i, as bf16 bit patterns in 16-bit lanes.
SPARSELM_AVX512 inline __m512i p14_load32(const Masked& m, int64_t i) {
  const __m512i perm = _mm512_loadu_si512(kP14Perm.b);
  int64_t pos = 14 * i, byte = pos >> 3;
  int64_t avail = m.value_bytes - byte;
  __mmask64 k = avail >= 64 ? ~__mmask64(0) : (avail <= 0 ? 0 : ((__mmask64(1) << avail) - 1));
  __m512i raw = _mm512_maskz_loadu_epi8(k, static_cast<const uint8_t*>(m.values) + byte);
  __m512i q = _mm512_permutexvar_epi8(perm, raw);  // qword j = bytes 7j..7j+7: values 4j..4j+3
  __m512i v = _mm512_multishift_epi64_epi8(_mm512_loadu_si512(kP14Ctrl[(pos & 7) >> 1].b), q);
  return _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x3FFF)), 2);
}

// the mask word of row r's chunk at col (n columns): straight from memory when `aligned` (cols a multiple of 32, a
// plain mask), else through read_bits
inline uint32_t chunk_bits(const Masked& m, int64_t r, int64_t col, int n, bool aligned) {
  uint32_t w;
  if (aligned) std::memcpy(&w, m.mask + ((r * m.cols + col) >> 3), 4);
  else w = read_bits(m, r, col, n);
  return w;
}

// the 32 16-bit values of a chunk under mask word w from value index idx (bf16, fp16, or 14-bit decoded to bf16),
// zeros where unset
template <int K>
SPARSELM_AVX512 inline __m512i chunk16(const Masked& m, int64_t idx, uint32_t w) {
  if constexpr (K == P14) return _mm512_maskz_expand_epi16(w, p14_load32(m, idx));
  else return _mm512_maskz_expandloadu_epi16(w, static_cast<const uint16_t*>(m.values) + idx);
}

// the 32 weights of columns c..c+31 under mask word w (zeros where unset), as two fp32 vectors. K is the
// value kind as a compile-time constant (no per-chunk switch in the hot loops).
template <int K>
SPARSELM_AVX512 __attribute__((always_inline)) inline void decode32_k(const Masked& m, int64_t idx, uint32_t w, __m512& lo, __m512& hi) {
  if constexpr (K == FP16 || K == BF16) {
    // two 16-lane expand-loads, each widened as it is: one 32-lane VPEXPANDW and the extract of its high half took
    // 1.2-1.4x as long at 1-2 tokens on Zen 4 (fp16 layers at 50 %, docs/benchmarks/kernels_fp16_ab.md). The
    // VDPBF16PS path keeps the 32-lane load (`chunk16`): split there it ran 1.2x slower (one run, 2048x8192).
    const uint16_t* f = static_cast<const uint16_t*>(m.values) + idx;
    const __m256i a = _mm256_maskz_expandloadu_epi16(__mmask16(w), f);
    const __m256i b = _mm256_maskz_expandloadu_epi16(__mmask16(w >> 16), f + _mm_popcnt_u32(w & 0xFFFF));
    if constexpr (K == FP16) { lo = _mm512_cvtph_ps(a); hi = _mm512_cvtph_ps(b); }
    else { lo = bf16x16_to_ps(a); hi = bf16x16_to_ps(b); }
  } else if constexpr (K == P14) {
    __m512i v = chunk16<K>(m, idx, w);
    lo = bf16x16_to_ps(_mm512_castsi512_si256(v));
    hi = bf16x16_to_ps(_mm512_extracti64x4_epi64(v, 1));
  } else if constexpr (K == FP32) {
    const float* f = static_cast<const float*>(m.values) + idx;
    lo = _mm512_maskz_expandloadu_ps(__mmask16(w), f);
    hi = _mm512_maskz_expandloadu_ps(__mmask16(w >> 16), f + _mm_popcnt_u32(w & 0xFFFF));
  } else if constexpr (K == INT8) {
    // two 16-lane expand-loads, as for fp16 above: a 0.4 dictionary with int8 coefficients at one token 0.82-1.02x
    // the old time on 8 shapes (median 0.93; gate/up 0.82-0.85x), against a control of unchanged code at 0.96-1.00x
    // (docs/benchmarks/kernels_int8_ab.md). Grouped int8 keeps the one 32-byte load: split, it read 1.02-1.05x.
    const int8_t* f = static_cast<const int8_t*>(m.values) + idx;
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expandloadu_epi8(__mmask16(w), f)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expandloadu_epi8(__mmask16(w >> 16),
                                                                          f + _mm_popcnt_u32(w & 0xFFFF))));
  } else if constexpr (K == INT8G) {
    __m256i b = _mm256_maskz_expandloadu_epi8(w, static_cast<const int8_t*>(m.values) + idx);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
  } else if constexpr (K == INT4) {  // 32 nibbles from value idx: bytes idx/2.., one nibble per byte, expanded
    const int64_t byte = idx >> 1, avail = m.value_bytes - byte;
    const __mmask32 kb = avail >= 32 ? ~__mmask32(0) : (avail <= 0 ? 0 : __mmask32((1ull << avail) - 1));
    __m512i wds = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(kb, static_cast<const uint8_t*>(m.values) + byte));
    __m512i nib = _mm512_or_si512(_mm512_and_si512(wds, _mm512_set1_epi16(0x000F)),
                                  _mm512_slli_epi16(_mm512_and_si512(wds, _mm512_set1_epi16(0x00F0)), 4));
    // an odd first nibble: every byte moves down one (a select, not a branch: idx's parity is random)
    nib = _mm512_mask_mov_epi8(nib, __mmask64(-uint64_t(idx & 1)),
                               _mm512_permutexvar_epi8(_mm512_loadu_si512(kNextByte.b), nib));
    __m256i q = _mm256_maskz_expand_epi8(w, _mm512_castsi512_si256(nib));
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
  }
}

// Decode reads each row's mask and values once, front to back. The hardware prefetcher does not keep up
// with these data-dependent streams (a value address is known only after the mask word's popcount), so
// each chunk prefetches its row's values and mask a few KiB ahead; measured on the project's CPU this
// takes a row from 5-17 ns to ~1.9 ns per 32 inputs (docs/benchmarks/README.md, "Kernels").
constexpr int64_t kPrefetchBytes = 4096;

template <int K> constexpr int64_t value_byte(int64_t i) {
  return K == FP32 ? 4 * i : (K == INT8 || K == INT8G ? i : (K == P14 ? (14 * i) >> 3 : (K == INT4 ? i >> 1 : 2 * i)));
}

// the group parameters along one row, looked up once per group (not per chunk). Inlined into the SIMD loops: a
// call out of them clobbers every vector register (the AVX2 grouped int8 GEMV of 8192x2048 at 50 %, 1 token, ran
// 5.6x (group 128) and 15x (group 32) slower with the call). Columns only move right, so the cursor steps from
// group to group by additions: a division per group (two for blocks, with the kept-block count) cost more than
// the chunk's arithmetic (int4 / g128 at 50 %, 8192x2048, one token: see docs/benchmarks/kernels.md).
struct GroupCursor {
  const Masked& m; int64_t r;
  int64_t width = m.block ? m.block : m.group;  // columns per group (0: one per row)
  int64_t first = m.block ? 0 : r * m.gpr;      // row r's first group (blocks: set on first use, see at)
  int64_t g = -1, next = 0;                     // the current group along the row, and the column after it
  int64_t kept = 0;                             // blocks: kept blocks of row r before block g
  float s = 1.f, z = 0.f;
  __attribute__((target("f16c"), always_inline)) void at(int64_t col) {  // only in the AVX2 / AVX-512 loops
    if (col < next) return;
    if (!width) { params_of_f16c(m, first, s, z); next = INT64_MAX; return; }
    if (m.block && g < 0) first = m.offsets[r] / m.block;  // the groups of earlier rows' kept blocks
    do {
      if (m.block && g >= 0) kept += block_kept(m, r, g);
      g++; next += width;
    } while (col >= next);
    if (m.block) block_params(m, r, g, first + kept, s, z);
    else params_of_f16c(m, first + g, s, z);
  }
};

// grouped kinds: the decoded codes of chunk (r, col) under mask word w become (code - zero)·scale. Each half
// of 16 columns lies in one group (gemv_level takes another path unless group % 16 == 0): groups of 16 (GQSA's
// blocks) give the halves their own parameters; for larger groups the second lookup is one compare.
template <int K>
SPARSELM_AVX512 __attribute__((always_inline)) inline void dequant_chunk(GroupCursor& gc, int64_t col, uint32_t w, __m512& lo, __m512& hi) {
  if constexpr (K == INT8G) {  // no zero point: the expand left 0 where unset, and 0·s = 0
    gc.at(col);
    lo = _mm512_mul_ps(lo, _mm512_set1_ps(gc.s));
    if (col + 16 < gc.m.cols) gc.at(col + 16);  // no group past the row's end is looked up
    hi = _mm512_mul_ps(hi, _mm512_set1_ps(gc.s));
  } else if constexpr (K == INT4) {
    gc.at(col);
    lo = _mm512_mul_ps(_mm512_maskz_sub_ps(__mmask16(w), lo, _mm512_set1_ps(gc.z)), _mm512_set1_ps(gc.s));
    if (col + 16 < gc.m.cols) gc.at(col + 16);
    hi = _mm512_mul_ps(_mm512_maskz_sub_ps(__mmask16(w >> 16), hi, _mm512_set1_ps(gc.z)), _mm512_set1_ps(gc.s));
  }
}

// int4 codes against bf16 x (VDPBF16PS): the chunk's weights come from a 32-entry bf16 table, lane c the weight
// (c − z)·s of code c in the group of the chunk's low 16 columns, lane 16 + c the same for its high 16 columns
// (one group for both unless groups are 16 columns wide). (c − z)·s is rounded to bf16 as the reference forward
// rounds the decoded weight (fp32, then round to nearest even), so the products are the reference's. A group's
// table is built once (for groups of 16: once per chunk).
constexpr Bytes64 nibble_bytes(int p) {  // 16-bit lane i: the byte that holds nibble p + i (high bytes unused)
  Bytes64 t{};
  for (int i = 0; i < 32; i++) t.b[2 * i] = uint8_t((p + i) >> 1);
  return t;
}
struct Words32 { uint16_t w[32]; };
constexpr Words32 nibble_shifts(int p) {  // and the shift that brings that nibble down
  Words32 t{};
  for (int i = 0; i < 32; i++) t.w[i] = uint16_t(4 * ((p + i) & 1));
  return t;
}
alignas(64) constexpr Bytes64 kNibbleBytes[2] = {nibble_bytes(0), nibble_bytes(1)};
alignas(64) constexpr Words32 kNibbleShifts[2] = {nibble_shifts(0), nibble_shifts(1)};
alignas(64) constexpr float kIota16[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// the 32 codes from value index idx, one per 16-bit lane in stored order (idx's parity picks the tables: no branch)
SPARSELM_AVX512 inline __m512i int4_codes32(const Masked& m, int64_t idx) {
  const int64_t byte = idx >> 1, avail = m.value_bytes - byte;
  const int p = int(idx & 1);
  const __mmask32 kb = avail >= 32 ? ~__mmask32(0) : (avail <= 0 ? 0 : __mmask32((1ull << avail) - 1));
  const __m512i raw = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8(kb, static_cast<const uint8_t*>(m.values) + byte));
  const __m512i b = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, _mm512_load_si512(kNibbleBytes[p].b), raw);
  return _mm512_and_si512(_mm512_srlv_epi16(b, _mm512_load_si512(kNibbleShifts[p].w)), _mm512_set1_epi16(0x000F));
}

// the table of the chunk at col (rebuilt only when the chunk's group is not the last table's: `key`)
SPARSELM_AVX512 __attribute__((always_inline)) inline void int4_table(GroupCursor& gc, int64_t col, __m512i& table,
                                                                     int64_t& key) {
  gc.at(col);
  const bool split = gc.width == 16;  // the two halves in two groups
  if (!split && gc.next == key) return;
  key = gc.next;
  const __m512 iota = _mm512_load_ps(kIota16);
  const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(gc.z)), _mm512_set1_ps(gc.s));
  __m512 hi = lo;
  if (split && col + 16 < gc.m.cols) {  // no group past the row's end is looked up
    gc.at(col + 16);
    hi = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(gc.z)), _mm512_set1_ps(gc.s));
  }
  table = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// the 32 bf16 weights of a chunk of int4 codes under mask word w (0 where unset)
SPARSELM_AVX512 inline __m512i int4_chunk16(const Masked& m, int64_t idx, uint32_t w, __m512i table) {
  const __m512i codes = _mm512_maskz_expand_epi16(w, int4_codes32(m, idx));  // each code in its column
  const __m512i half = _mm512_set_epi16(16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16,
                                        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_maskz_permutexvar_epi16(w, _mm512_or_si512(codes, half), table);
}

// a prefetch hint at base + off (never faults, so no bounds check; integer arithmetic, no pointer past the end)
inline void prefetch_at(const void* base, int64_t off) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + uintptr_t(off)), 0, 3);
}

// One row of Y = X Mᵀ for TT tokens: U chunks of 32 columns in flight (independent accumulators hide the
// FMA / dot-product latency). DP: bf16 values (plain or 14-bit), or int4 codes through their group's bf16 table
// (int4_table), against bf16 x with VDPBF16PS; otherwise the values are decoded to fp32 and FMA'd against fp32 x.
// Any cols (the last chunk is masked).
template <int U, int TT, int K, bool DP>
SPARSELM_AVX512 inline void gemv_row(const Masked& m, const void* xv, int64_t r, float (&out)[TT]) {
  const int64_t nchunks = (m.cols + 31) / 32;
  const bool aligned = m.cols % 32 == 0 && m.mask && !m.block;  // else read_bits gives the bits
  int64_t idx = m.offsets[r];
  const int64_t bit = r * m.cols;
  GroupCursor gc{m, r};
  __m512i table = _mm512_setzero_si512();  // DP int4: the weights of the chunk's codes (int4_table)
  int64_t table_key = -1;
  __m512 acc[U][TT];
  #pragma GCC unroll 8
  for (int u = 0; u < U; u++) for (int t = 0; t < TT; t++) acc[u][t] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < nchunks; c0 += U) {
    // unrolled: the accumulators acc[u] must stay in registers (GCC kept the int4 body's loop rolled, with
    // acc on the stack indexed by u: int4 at one token 1.8x slower than bf16 values; docs/benchmarks/kernels.md)
#pragma GCC unroll 8
    for (int u = 0; u < U; u++) {
      const int64_t c = c0 + u;
      if (c >= nchunks) break;
      const int64_t col = 32 * c;
      const int n = int(std::min<int64_t>(32, m.cols - col));
      const uint32_t w = chunk_bits(m, r, col, n, aligned);
      prefetch_at(m.values, value_byte<K>(idx) + kPrefetchBytes);  // this row's values, 4 KiB ahead
      if (u == 0) prefetch_at(m.mask, ((bit + col) >> 3) + 512);   // its mask (one line per U chunks)
      if (!w) continue;
      if constexpr (DP) {
        const uint16_t* x = static_cast<const uint16_t*>(xv);
        __m512i v;
        if constexpr (K == INT4) {
          int4_table(gc, col, table, table_key);
          v = int4_chunk16(m, idx, w, table);
        } else if constexpr (K == BF16 || K == P14) {
          v = chunk16<K>(m, idx, w);
        } else {  // decoded (and dequantized) in fp32, then rounded to bf16 as the reference rounds its weight
          __m512 lo, hi;
          decode32_k<K>(m, idx, w, lo, hi);
          dequant_chunk<K>(gc, col, w, lo, hi);
          v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        }
        __mmask32 k = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
        #pragma GCC unroll 8
        for (int t = 0; t < TT; t++) {
          __m512i xt = _mm512_maskz_loadu_epi16(k, x + t * m.cols + col);
          acc[u][t] = _mm512_dpbf16_ps(acc[u][t], (__m512bh)v, (__m512bh)xt);
        }
      } else {
        const float* x = static_cast<const float*>(xv);
        __m512 lo, hi;
        decode32_k<K>(m, idx, w, lo, hi);
        dequant_chunk<K>(gc, col, w, lo, hi);
        __mmask16 klo = n >= 16 ? 0xFFFF : __mmask16((1u << n) - 1);
        __mmask16 khi = n >= 32 ? 0xFFFF : (n <= 16 ? 0 : __mmask16((1u << (n - 16)) - 1));
        #pragma GCC unroll 8
        for (int t = 0; t < TT; t++) {
          const float* xt = x + t * m.cols + col;
          acc[u][t] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(klo, xt), acc[u][t]);
          acc[u][t] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(khi, xt + 16), acc[u][t]);
        }
      }
      idx += _mm_popcnt_u32(w);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) {
    __m512 s = acc[0][t];
    for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[u][t]);
    out[t] = _mm512_reduce_add_ps(s);
  }
}

// Rows r and r + 1 of Y = X Mᵀ for TT tokens, bf16 values (plain or 14-bit; int4 codes through each row's table)
// against bf16 x with VDPBF16PS: each 32-column chunk of x is loaded once for both rows. From 3 tokens on, one row
// at a time loaded TT chunks of x per chunk of its own values, so x's loads (from cache, but TT of them)
// outnumbered the row's own bytes. At 2 tokens pairs were no faster (0.87-1.38x on four Llama shapes, 50 %, EPYC),
// as the row there keeps two chunks in flight. int4/g128 at 3-8 tokens: pairs 0.62-0.72x the single rows' time.
// One chunk per row in flight (2·TT accumulators); per row the same products in the same order as gemv_row at
// these token counts (one chunk in flight there too), so the same results for finite inputs.
template <int TT, int K>
SPARSELM_AVX512 inline void gemv_row_pair(const Masked& m, const uint16_t* x, int64_t r, float (&out0)[TT],
                                          float (&out1)[TT]) {
  const int64_t nchunks = (m.cols + 31) / 32;
  const bool aligned = m.cols % 32 == 0 && m.mask && !m.block;  // else read_bits gives the bits
  int64_t idx0 = m.offsets[r], idx1 = m.offsets[r + 1];
  const int64_t bit0 = r * m.cols, bit1 = bit0 + m.cols;
  GroupCursor gc0{m, r}, gc1{m, r + 1};  // int4: each row's table of its groups' weights (int4_table)
  __m512i table0 = _mm512_setzero_si512(), table1 = _mm512_setzero_si512();
  int64_t key0 = -1, key1 = -1;
  __m512 a0[TT], a1[TT];
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t col = 32 * c;
    const int n = int(std::min<int64_t>(32, m.cols - col));
    const uint32_t w0 = chunk_bits(m, r, col, n, aligned), w1 = chunk_bits(m, r + 1, col, n, aligned);
    prefetch_at(m.values, value_byte<K>(idx0) + kPrefetchBytes);  // both rows' values, 4 KiB ahead
    prefetch_at(m.values, value_byte<K>(idx1) + kPrefetchBytes);
    if (c % 4 == 0) {  // their masks (one line per 4 chunks)
      prefetch_at(m.mask, ((bit0 + col) >> 3) + 512);
      prefetch_at(m.mask, ((bit1 + col) >> 3) + 512);
    }
    if (!(w0 | w1)) continue;
    __m512i v0, v1;
    if constexpr (K == INT4) {
      int4_table(gc0, col, table0, key0);
      int4_table(gc1, col, table1, key1);
      v0 = int4_chunk16(m, idx0, w0, table0);
      v1 = int4_chunk16(m, idx1, w1, table1);
    } else {
      v0 = chunk16<K>(m, idx0, w0);
      v1 = chunk16<K>(m, idx1, w1);
    }
    const __mmask32 k = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {
      const __m512i xt = _mm512_maskz_loadu_epi16(k, x + t * m.cols + col);
      a0[t] = _mm512_dpbf16_ps(a0[t], (__m512bh)v0, (__m512bh)xt);
      a1[t] = _mm512_dpbf16_ps(a1[t], (__m512bh)v1, (__m512bh)xt);
    }
    idx0 += _mm_popcnt_u32(w0);
    idx1 += _mm_popcnt_u32(w1);
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) {
    out0[t] = _mm512_reduce_add_ps(a0[t]);
    out1[t] = _mm512_reduce_add_ps(a1[t]);
  }
}

// Mask-free int4 (every entry kept: a GPTQ layer, an int4 factor) against bf16 x, groups a multiple of 64
// columns: no mask bits, no expand. 32 bytes hold 64 codes, the low nibbles the even columns and the high ones
// the odd columns; each half becomes bf16 through a 16-entry table (VPERMW; 0..15 are exact) and meets x's even
// or odd columns (deinterleaved once per call, `deinterleave64`) in VDPBF16PS. A group's Σ code·x is scaled
// once and its zero point enters as z·Σx over the group (per token, once per call):
// Σ (code − z)·s·x = s·(Σ code·x − z·Σ x). The general path decodes every 32 codes to fp32 through an expand.
alignas(64) constexpr uint16_t kNibbleBF16[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};  // bf16 of 0..15 (VPERMW reads 5 bits)

inline bool int4_direct(const Masked& m) {
  const int64_t g = m.group ? m.group : m.cols;
  return m.kind == INT4 && !m.mask && !m.block && g % 64 == 0 && m.cols % g == 0;
}

// x (T, cols) bf16 -> per 64 columns its 32 even then its 32 odd columns; and per token the sum of each group
void deinterleave64(const uint16_t* x, int64_t T, int64_t cols, int64_t group, uint16_t* xd, float* gsum) {
  const int64_t g = group ? group : cols, ngroups = cols / g;
  for (int64_t t = 0; t < T; t++) {
    const uint16_t* xt = x + t * cols;
    uint16_t* dt = xd + t * cols;
    for (int64_t c = 0; c < cols; c += 64)
      for (int i = 0; i < 32; i++) { dt[c + i] = xt[c + 2 * i]; dt[c + 32 + i] = xt[c + 2 * i + 1]; }
    for (int64_t gi = 0; gi < ngroups; gi++) {
      float sum = 0.f;
      for (int64_t j = gi * g; j < (gi + 1) * g; j++) sum += float(c10::BFloat16(xt[j], c10::BFloat16::from_bits()));
      gsum[t * ngroups + gi] = sum;
    }
  }
}

template <int TT>
SPARSELM_AVX512 inline void int4_row(const Masked& m, const uint16_t* xd, const float* gsum, int64_t r,
                                     float (&out)[TT]) {
  const int64_t g = m.group ? m.group : m.cols, per = g / 64, ngroups = m.cols / g;
  const uint8_t* v = static_cast<const uint8_t*>(m.values) + (m.offsets[r] >> 1);
  const __m512i lut = _mm512_load_si512(kNibbleBF16), low = _mm512_set1_epi16(0x000F);
  __m512 total[TT];
  float zt[TT];
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) { total[t] = _mm512_setzero_ps(); zt[t] = 0.f; }
  for (int64_t gi = 0; gi < ngroups; gi++) {
    float s, z;
    params_of_f16c(m, r * m.gpr + (m.group ? gi : 0), s, z);
    __m512 even[TT], odd[TT];
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) { even[t] = _mm512_setzero_ps(); odd[t] = _mm512_setzero_ps(); }
    for (int64_t c = gi * per; c < (gi + 1) * per; c++) {
      prefetch_at(v, 32 * c + kPrefetchBytes);
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * c)));
      const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(b, low), lut);
      const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);
      #pragma GCC unroll 8
      for (int t = 0; t < TT; t++) {
        const uint16_t* xt = xd + t * m.cols + 64 * c;
        even[t] = _mm512_dpbf16_ps(even[t], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xt));
        odd[t] = _mm512_dpbf16_ps(odd[t], (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xt + 32));
      }
    }
    const __m512 sv = _mm512_set1_ps(s);
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {
      total[t] = _mm512_fmadd_ps(_mm512_add_ps(even[t], odd[t]), sv, total[t]);
      zt[t] += s * z * gsum[t * ngroups + gi];
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) out[t] = _mm512_reduce_add_ps(total[t]) - zt[t];
}

// GQSA's 1×block format (grouped int4 / int8, block a multiple of 16 columns) against fp32 x: the row's block
// mask is walked by its set bits, and each kept block's codes (contiguous, one group) are read straight — 16
// at a time to fp32, (code - zero)·scale in one FMA, then FMA'd against x. The general path spends per 32
// columns a mask word built bit by bit from the blocks and two group look-ups (9-10x dense at g16, 1 token).
inline bool blocks_direct(const Masked& m) {
  return m.block && m.block % 16 == 0 && m.mask && (m.kind == INT4 || m.kind == INT8G);
}

// 16 codes of a kept block from value idx as fp32 (int4: 8 bytes, low nibble first; idx is even, blocks being
// multiples of 16 columns)
template <int K>
SPARSELM_AVX512 __attribute__((always_inline)) inline __m512 block_codes16(const uint8_t* codes, int64_t idx) {
  __m512i ci;
  if constexpr (K == INT4) {
    const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + (idx >> 1)));
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
    ci = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  } else {
    ci = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + idx)));
  }
  return _mm512_cvtepi32_ps(ci);
}

// one kept block (from column col0; its values from idx, its group g: both advanced) into the accumulators a
template <int TT, int K>
SPARSELM_AVX512 __attribute__((always_inline)) inline void kept_block(const Masked& m, const float* x, int64_t col0,
                                                                      int64_t& idx, int64_t& g, __m512 (&a)[TT]) {
  const uint8_t* codes = static_cast<const uint8_t*>(m.values);
  float s, z;
  params_of_f16c(m, g++, s, z);
  const __m512 sv = _mm512_set1_ps(s), zs = _mm512_set1_ps(-z * s);
  prefetch_at(codes, value_byte<K>(idx) + kPrefetchBytes);
  for (int64_t c = 0; c < m.block; c += 16, idx += 16) {
    const __m512 v = _mm512_fmadd_ps(block_codes16<K>(codes, idx), sv, zs);  // (code - z)·s
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) a[t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * m.cols + col0 + c), a[t]);
  }
}

template <int TT, int K>
SPARSELM_AVX512 inline void block_row(const Masked& m, const float* x, int64_t r, float (&out)[TT]) {
  __m512 acc[2][TT];  // two chains, kept blocks alternating between them (static indices: registers, not stack)
  #pragma GCC unroll 8
  for (int u = 0; u < 2; u++) for (int t = 0; t < TT; t++) acc[u][t] = _mm512_setzero_ps();
  int64_t idx = m.offsets[r], g = idx / m.block;  // the row's first value and group (kept block)
  for (int64_t b0 = 0; b0 < m.gpr; b0 += 64) {
    const int n = int(std::min<int64_t>(64, m.gpr - b0));
    uint64_t bits = bits64(m, r * m.gpr + b0);
    if (n < 64) bits &= (1ull << n) - 1;
    while (bits) {
      kept_block<TT, K>(m, x, (b0 + __builtin_ctzll(bits)) * m.block, idx, g, acc[0]);
      bits &= bits - 1;
      if (!bits) break;
      kept_block<TT, K>(m, x, (b0 + __builtin_ctzll(bits)) * m.block, idx, g, acc[1]);
      bits &= bits - 1;
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]));
}

// Mask-free int8 (every entry kept; a scale per row or per group of a multiple of 64 columns) against fp32 x:
// 16 codes at a time sign-extended straight from memory and FMA'd, a group's sum scaled once — no mask bits, no
// expand, no per-chunk dequantization (the general path's cost at one token).
inline bool int8_direct(const Masked& m) {
  if (m.mask || m.block || m.cols % 64) return false;
  return m.kind == INT8 || (m.kind == INT8G && m.group % 64 == 0 && m.group && m.cols % m.group == 0);
}

template <int TT>
SPARSELM_AVX512 inline void int8_row(const Masked& m, const float* x, int64_t r, float (&out)[TT]) {
  constexpr int U = TT == 1 ? 4 : (TT == 2 ? 2 : 1);  // independent accumulators per token
  const int64_t g = m.kind == INT8G ? m.group : m.cols, ngroups = m.cols / g;
  const int8_t* v = static_cast<const int8_t*>(m.values) + m.offsets[r];
  __m512 total[TT];
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) total[t] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < ngroups; gi++) {
    __m512 acc[U][TT];
    #pragma GCC unroll 8
    for (int u = 0; u < U; u++) for (int t = 0; t < TT; t++) acc[u][t] = _mm512_setzero_ps();
    for (int64_t c = gi * g; c < (gi + 1) * g; c += 64) {
      prefetch_at(v, c + kPrefetchBytes);
      #pragma GCC unroll 8
      for (int q = 0; q < 4; q++) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + c + 16 * q))));
        #pragma GCC unroll 8
        for (int t = 0; t < TT; t++)
          acc[q % U][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * m.cols + c + 16 * q), acc[q % U][t]);
      }
    }
    const __m512 sv = _mm512_set1_ps(m.kind == INT8G ? float(m.gscale[r * m.gpr + gi]) : 1.f);
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {
      __m512 a = acc[0][t];
      for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[u][t]);
      total[t] = _mm512_fmadd_ps(a, sv, total[t]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) out[t] = _mm512_reduce_add_ps(total[t]);
}

// R dense rows of W (rows, cols) row-major bf16 against bf16 x, walked side by side: U chunks of every row,
// then the next U (R streams in flight, each prefetched 4 KiB ahead; one row at a time read 4 KiB rows at
// 11-12 GB/s on one thread here, four side by side 28-40 GB/s; the masked rows above did not gain from it).
template <int R, int TT, int U>
SPARSELM_AVX512 inline void dense_rows(const uint16_t* W, int64_t cols, const uint16_t* x, int64_t r,
                                       float (&out)[R][TT]) {
  static_assert(U == 1 || U == 2, "one or two chunks of a row in flight (the reduction below adds at most two)");
  __m512 acc[R][U][TT];
  #pragma GCC unroll 8
  for (int i = 0; i < R; i++) for (int u = 0; u < U; u++) for (int t = 0; t < TT; t++) acc[i][u][t] = _mm512_setzero_ps();
  // rows shorter than the prefetch distance (the low-rank factors' Vᵀ, r = 1228 columns): 4 KiB ahead would land
  // in the R rows read side by side now, so prefetch the same place R rows down instead
  const int64_t ahead = 2 * cols >= kPrefetchBytes ? kPrefetchBytes : 2 * R * cols;
  for (int64_t col = 0; col < cols; col += 32 * U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; u++) {  // unrolled: acc in registers (rolled, GCC kept it on the stack, as in gemv_row)
      const int64_t c = col + 32 * u;
      if (c >= cols) break;
      const int n = int(std::min<int64_t>(32, cols - c));
      const __mmask32 k = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
      __m512i xt[TT];
      #pragma GCC unroll 8
      for (int t = 0; t < TT; t++) xt[t] = _mm512_maskz_loadu_epi16(k, x + t * cols + c);
      #pragma GCC unroll 8
      for (int i = 0; i < R; i++) {
        const uint16_t* w = W + (r + i) * cols;
        if (u == 0) prefetch_at(w, 2 * c + ahead);
        __m512i v = _mm512_maskz_loadu_epi16(k, w + c);
        #pragma GCC unroll 8
        for (int t = 0; t < TT; t++) acc[i][u][t] = _mm512_dpbf16_ps(acc[i][u][t], (__m512bh)v, (__m512bh)xt[t]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < R; i++) for (int t = 0; t < TT; t++)
    out[i][t] = _mm512_reduce_add_ps(U == 1 ? acc[i][0][t] : _mm512_add_ps(acc[i][0][t], acc[i][U - 1][t]));
}

template <typename OutT, int K>
SPARSELM_AVX512 void unpack_rows_k(const Masked& m, int64_t r0, int64_t r1, OutT* out) {
  for (int64_t r = r0; r < r1; r++) {
    OutT* o = out + r * m.cols;
    int64_t idx = m.offsets[r], bit = r * m.cols;
    GroupCursor gc{m, r};
    __m512 s = _mm512_set1_ps(m.scale ? m.scale[r] : 1.f);
    for (int64_t c = 0; c < m.cols; c += 32) {
      int n = int(std::min<int64_t>(32, m.cols - c));
      uint32_t w = read_bits(m, r, c, n);
      prefetch_at(m.values, value_byte<K>(idx) + kPrefetchBytes);
      if ((c & 511) == 0) prefetch_at(m.mask, ((bit + c) >> 3) + 512);
      __mmask32 k = n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
      if constexpr (K == BF16 && std::is_same<OutT, c10::BFloat16>::value) {  // copy the bits, no rounding
        _mm512_mask_storeu_epi16(o + c, k, chunk16<K>(m, idx, w));
      } else {
        __m512 lo, hi;
        decode32_k<K>(m, idx, w, lo, hi);
        dequant_chunk<K>(gc, c, w, lo, hi);
        if (m.scale) { lo = _mm512_mul_ps(lo, s); hi = _mm512_mul_ps(hi, s); }
        if constexpr (std::is_same<OutT, float>::value) {
          _mm512_mask_storeu_ps(o + c, __mmask16(k), lo);
          _mm512_mask_storeu_ps(o + c + 16, __mmask16(k >> 16), hi);
        } else {
          __m256i a, b;
          if constexpr (std::is_same<OutT, c10::BFloat16>::value) {
            a = (__m256i)_mm512_cvtneps_pbh(lo); b = (__m256i)_mm512_cvtneps_pbh(hi);
          } else {
            a = _mm512_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            b = _mm512_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          }
          __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
          _mm512_mask_storeu_epi16(o + c, k, v);
        }
      }
      idx += _mm_popcnt_u32(w);
    }
  }
}

// 16 fp32 lanes into o as OutT (bf16 / fp16 rounded to nearest even, as OutT(float) rounds)
template <typename OutT>
SPARSELM_AVX512 __attribute__((always_inline)) inline void store16(OutT* o, __m512 v) {
  if constexpr (std::is_same<OutT, float>::value) _mm512_storeu_ps(o, v);
  else if constexpr (std::is_same<OutT, c10::BFloat16>::value)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), (__m256i)_mm512_cvtneps_pbh(v));
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// GQSA blocks (`blocks_direct`) unpacked kept block by kept block, as block_row reads them: the row zeroed, then
// each kept block's (code - zero)·scale (the scalar loop's operations, so the same values bit for bit)
template <typename OutT, int K>
SPARSELM_AVX512 void unpack_block_rows(const Masked& m, int64_t r0, int64_t r1, OutT* out) {
  const uint8_t* codes = static_cast<const uint8_t*>(m.values);
  for (int64_t r = r0; r < r1; r++) {
    OutT* o = out + r * m.cols;
    std::memset(static_cast<void*>(o), 0, sizeof(OutT) * m.cols);
    int64_t idx = m.offsets[r], g = idx / m.block;
    for (int64_t b0 = 0; b0 < m.gpr; b0 += 64) {  // the kept blocks by the set bits, as block_row walks them
      uint64_t bits = bits64(m, r * m.gpr + b0);
      if (m.gpr - b0 < 64) bits &= (1ull << (m.gpr - b0)) - 1;
      for (; bits; bits &= bits - 1) {
        const int64_t b = b0 + __builtin_ctzll(bits);
        float s, z;
        params_of_f16c(m, g++, s, z);
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
        for (int64_t c = 0; c < m.block; c += 16, idx += 16)
          store16(o + b * m.block + c, _mm512_mul_ps(_mm512_sub_ps(block_codes16<K>(codes, idx), zv), sv));
      }
    }
  }
}

template <typename OutT>
void unpack_rows_avx(const Masked& m, int64_t r0, int64_t r1, OutT* out) {  // the kind as a constant (decode32_k)
  if (blocks_direct(m)) {
    if (m.kind == INT4) unpack_block_rows<OutT, INT4>(m, r0, r1, out);
    else unpack_block_rows<OutT, INT8G>(m, r0, r1, out);
    return;
  }
  with_kind(m.kind, [&](auto k) { unpack_rows_k<OutT, decltype(k)::value>(m, r0, r1, out); });
}

// ---- AVX2 + FMA + F16C (CPUs without the AVX-512 set, or SPARSELM_ISA=avx2) -------------------------------
// No expand-load and no bf16 dot product here: 8 mask bits at a time, a 256-entry table gives each lane the
// rank of its bit among the set ones (a VPERMPS index) and the next 8 stored values, decoded to fp32, are
// spread over their columns; bf16 becomes fp32 by a byte shuffle, then FMA against fp32 x.
#define SPARSELM_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))

// kExpand8.t[b][j]: the index of the value lane j takes under mask bits b (the rank of bit j among b's set
// bits), or the sign bit where bit j is unset (VPERMPS reads the low 3 bits, VBLENDVPS the sign: zeroed). 8 KiB.
struct Expand8 { int32_t t[256][8]; };
constexpr Expand8 expand8_table() {
  Expand8 e{};
  for (int b = 0; b < 256; b++) {
    int k = 0;
    for (int j = 0; j < 8; j++) e.t[b][j] = (b >> j) & 1 ? k++ : INT32_MIN;
  }
  return e;
}
alignas(64) constexpr Expand8 kExpand8 = expand8_table();

// bf16 values in one VPSHUFB: with the next 8 values (16 bytes) in both 128-bit halves, kShufBf16.t[b] puts
// value rank(j)'s two bytes in the high half of 32-bit lane j (the fp32 of that bf16) and zero bytes (0x80)
// everywhere else, so unset lanes come out 0.0 without a blend. 8 KiB.
struct ShufBf16 { uint8_t t[256][32]; };
constexpr ShufBf16 shuf_bf16() {
  ShufBf16 e{};
  for (int b = 0; b < 256; b++) {
    int k = 0;
    for (int j = 0; j < 8; j++) {
      const bool set = (b >> j) & 1;
      uint8_t* lane = e.t[b] + 4 * j;  // lanes 0-3 in the low half, 4-7 in the high half: 4 j bytes either way
      lane[0] = lane[1] = 0x80;
      lane[2] = set ? uint8_t(2 * k) : 0x80;
      lane[3] = set ? uint8_t(2 * k + 1) : 0x80;
      k += set;
    }
  }
  return e;
}
alignas(64) constexpr ShufBf16 kShufBf16 = shuf_bf16();

// 14-bit values: with the 16 bytes from the one holding value i's first bit (bit offset o = 0, 2, 4 or 6 in
// it) in both 128-bit halves, shuf[o / 2] puts the 3 bytes holding value i+j in 32-bit lane j (the 4th byte
// zero) and a left shift by shift[o / 2][j] brings its 14 bits to the top: bf16 bits << 2, then << 16 for fp32.
struct ShufP14 { uint8_t shuf[4][32]; int32_t shift[4][8]; };
constexpr ShufP14 shuf_p14() {
  ShufP14 e{};
  for (int o = 0; o < 4; o++) for (int j = 0; j < 8; j++) {
    const int first = 2 * o + 14 * j;  // value i+j's first bit in the 16 bytes (at most 104: bytes 13-15)
    for (int k = 0; k < 4; k++) e.shuf[o][4 * j + k] = k < 3 ? uint8_t((first >> 3) + k) : uint8_t(0x80);
    e.shift[o][j] = 18 - (first & 7);
  }
  return e;
}
alignas(64) constexpr ShufP14 kP14 = shuf_p14();

// bytes one load of 8 values reads from a value's first byte (an int4 value's byte holds the next one too)
template <int K> constexpr int load_bytes() { return K == FP32 ? 32 : (K == INT8 || K == INT8G || K == INT4 ? 8 : 16); }

// whether the load of 8 values from value i stays inside the values buffer
template <int K> inline bool fits(const Masked& m, int64_t i) { return value_byte<K>(i) + load_bytes<K>() <= m.value_bytes; }

// where the load of 8 values from value i reads: the buffer itself, or (Checked, the last values of the matrix)
// `tail` holding the bytes left, zero-padded (a byte loop, not a memcpy call: a call in the row loop spills the sums)
template <int K, bool Checked>
__attribute__((always_inline)) inline const uint8_t* load_from(const Masked& m, int64_t i, uint8_t* tail) {
  const int64_t at = value_byte<K>(i);
  const uint8_t* p = static_cast<const uint8_t*>(m.values) + at;
  if (!Checked || fits<K>(m, i)) return p;
  for (int k = 0; k < load_bytes<K>(); k++) tail[k] = at + k < m.value_bytes ? p[k] : 0;
  return tail;
}

// the 8 stored values from index idx as fp32 (int8 / int4: the codes, no scale or zero point)
template <int K, bool Checked>
SPARSELM_AVX2 __attribute__((always_inline)) inline __m256 load8_k(const Masked& m, int64_t idx) {
  alignas(32) uint8_t tail[32];
  const uint8_t* p = load_from<K, Checked>(m, idx, tail);
  if constexpr (K == BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (K == FP16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (K == FP32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (K == P14) {
    const int o = int((14 * idx) & 7) >> 1;
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m256i g = _mm256_shuffle_epi8(raw, _mm256_load_si256(reinterpret_cast<const __m256i*>(kP14.shuf[o])));
    g = _mm256_sllv_epi32(g, _mm256_load_si256(reinterpret_cast<const __m256i*>(kP14.shift[o])));
    return _mm256_castsi256_ps(_mm256_and_si256(g, _mm256_set1_epi32(int(0xFFFC0000u))));
  } else if constexpr (K == INT4) {  // nibble k of the word from value idx's byte, shifted past an odd first one
    uint64_t w;
    std::memcpy(&w, p, 8);
    const __m256i codes = _mm256_srlv_epi32(_mm256_set1_epi32(int(uint32_t(w >> (4 * (idx & 1))))),
                                            _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(codes, _mm256_set1_epi32(0xF)));
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
}

// The values under mask bits b (the 8 columns from col) from index idx, as fp32 in their lanes and 0.0 in the
// others; the grouped kinds dequantized ((code - zero)·scale; the 8 columns lie in one group). Per-row int8
// scales are the caller's. Checked: the general case; otherwise the caller knows that 8 values from idx fit.
template <int K, bool Checked>
SPARSELM_AVX2 __attribute__((always_inline)) inline __m256 expand8(const Masked& m, int64_t idx, uint32_t b,
                                                                  GroupCursor& gc, int64_t col) {
  if constexpr (K == BF16) {
    alignas(32) uint8_t tail[32];
    const uint8_t* p = load_from<K, Checked>(m, idx, tail);
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(kShufBf16.t[b]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(raw, shuf));
  } else {
    __m256 v = load8_k<K, Checked>(m, idx);
    if constexpr (K == INT8G || K == INT4) {  // before the spread: unset lanes stay 0.0
      gc.at(col);
      v = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(gc.z)), _mm256_set1_ps(gc.s));
    }
    const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand8.t[b]));
    v = _mm256_permutevar8x32_ps(v, sel);
    return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(sel));
  }
}

SPARSELM_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// lanes 0..n-1 set (a VMASKMOVPS mask for the last, partial 8 columns of a row)
SPARSELM_AVX2 inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 columns of one row: the values under mask bits b (from index idx, advanced) spread over their lanes, FMA'd
// into acc against TT tokens of x at column col (the last, partial 8 columns of a row load x under a mask).
template <int TT, int K, bool Checked>
SPARSELM_AVX2 __attribute__((always_inline)) inline void expand_fma8(const Masked& m, int64_t& idx, uint32_t b,
                                                                    int64_t col, const float* x, GroupCursor& gc,
                                                                    __m256 (&acc)[TT]) {
  if (!b) return;
  const __m256 v = expand8<K, Checked>(m, idx, b, gc, col);
  idx += _mm_popcnt_u32(b);
  if (col + 8 <= m.cols) {
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) acc[t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + t * m.cols + col), acc[t]);
  } else {
    const __m256i k = first_lanes(m.cols - col);
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) acc[t] = _mm256_fmadd_ps(v, _mm256_maskload_ps(x + t * m.cols + col, k), acc[t]);
  }
}

// One row of Y = X Mᵀ for TT tokens (fp32 x): 32 mask bits read at a time, 8 columns per step, U accumulators
// per token in rotation (latency of the FMA chains; the four steps written out keep them in registers).
template <int U, int TT, int K, bool Checked>
SPARSELM_AVX2 inline void gemv_row_avx2(const Masked& m, const float* x, int64_t r, float (&out)[TT]) {
  const bool aligned = m.cols % 32 == 0 && m.mask && !m.block;  // else read_bits gives the bits
  int64_t idx = m.offsets[r];
  const int64_t bit = r * m.cols;
  GroupCursor gc{m, r};
  __m256 acc[U][TT];
  #pragma GCC unroll 8
  for (int u = 0; u < U; u++) for (int t = 0; t < TT; t++) acc[u][t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < m.cols; c += 32) {
    const int n = int(std::min<int64_t>(32, m.cols - c));
    const uint32_t w = chunk_bits(m, r, c, n, aligned);
    prefetch_at(m.values, value_byte<K>(idx) + kPrefetchBytes);  // this row's values, 4 KiB ahead
    if ((c & 255) == 0) prefetch_at(m.mask, ((bit + c) >> 3) + 512);  // its mask (one line per 512 columns)
    if (!w) continue;
    expand_fma8<TT, K, Checked>(m, idx, w & 0xFF, c, x, gc, acc[0]);
    expand_fma8<TT, K, Checked>(m, idx, (w >> 8) & 0xFF, c + 8, x, gc, acc[1 % U]);
    expand_fma8<TT, K, Checked>(m, idx, (w >> 16) & 0xFF, c + 16, x, gc, acc[2 % U]);
    expand_fma8<TT, K, Checked>(m, idx, w >> 24, c + 24, x, gc, acc[3 % U]);
  }
  #pragma GCC unroll 8
  for (int t = 0; t < TT; t++) {
    __m256 s = acc[0][t];
    for (int u = 1; u < U; u++) s = _mm256_add_ps(s, acc[u][t]);
    out[t] = hsum8(s);
  }
}

// 8 fp32 lanes into o[0..n-1] (n <= 8) as OutT, rounded as the scalar loop's OutT(float) rounds: to nearest
// even (bf16 by integer arithmetic as c10::BFloat16 does, NaN -> 0x7FC0; fp16 by F16C)
template <typename OutT>
SPARSELM_AVX2 inline void store8(OutT* o, __m256 v, int n) {
  if constexpr (std::is_same<OutT, float>::value) {
    if (n == 8) _mm256_storeu_ps(o, v);
    else _mm256_maskstore_ps(o, first_lanes(n), v);
  } else {
    __m128i h;
    if constexpr (std::is_same<OutT, c10::BFloat16>::value) {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                            _mm256_set1_epi32(0x7FFF));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (n == 8) { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), h); return; }
    alignas(16) uint16_t part[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
    for (int i = 0; i < n; i++) std::memcpy(o + i, part + i, 2);
  }
}

// Dense row r of M into o (cols,), 8 columns per step as the GEMV reads them; the same values as the scalar
// loop, bit for bit (the same float operations on each value, and the same rounding to OutT).
template <typename OutT, int K, bool Checked>
SPARSELM_AVX2 void unpack_row_avx2(const Masked& m, int64_t r, OutT* o) {
  int64_t idx = m.offsets[r];
  const int64_t bit = r * m.cols;
  GroupCursor gc{m, r};
  const __m256 s = _mm256_set1_ps(m.scale ? m.scale[r] : 1.f);
  for (int64_t c = 0; c < m.cols; c += 32) {
    const int n = int(std::min<int64_t>(32, m.cols - c));
    const uint32_t w = read_bits(m, r, c, n);
    prefetch_at(m.values, value_byte<K>(idx) + kPrefetchBytes);
    if ((c & 511) == 0) prefetch_at(m.mask, ((bit + c) >> 3) + 512);
    for (int q = 0; q < n; q += 8) {
      const uint32_t b = (w >> q) & 0xFF;
      __m256 v = _mm256_setzero_ps();
      if (b) {
        v = expand8<K, Checked>(m, idx, b, gc, c + q);
        if (m.scale) v = _mm256_mul_ps(v, s);  // per-row int8
        idx += _mm_popcnt_u32(b);
      }
      store8<OutT>(o + c + q, v, std::min(8, n - q));
    }
  }
}

template <typename OutT>
void unpack_rows_avx2(const Masked& m, int64_t r0, int64_t r1, OutT* out) {
  auto rows_of = [&](auto k) {
    constexpr int K = decltype(k)::value;
    for (int64_t r = r0; r < r1; r++) {  // rows whose loads all fit (all but the last few) skip the bounds check
      if (fits<K>(m, m.offsets[r + 1])) unpack_row_avx2<OutT, K, false>(m, r, out + r * m.cols);
      else unpack_row_avx2<OutT, K, true>(m, r, out + r * m.cols);
    }
  };
  with_kind(m.kind, rows_of);
}

// x (T, cols) bf16 as fp32 in the order dense_rows_avx2 reads W: within each full 16 columns the even
// columns, then the odd ones (a 32-bit lane of W holds columns 2k, 2k+1); the last cols % 16 as they are
void dense_x_avx2(const uint16_t* x, int64_t T, int64_t cols, float* out) {
  const int64_t full = cols & ~int64_t(15);
  for (int64_t t = 0; t < T; t++) {
    const uint16_t* xt = x + t * cols;
    float* o = out + t * cols;
    for (int64_t c = 0; c < full; c += 16)
      for (int k = 0; k < 8; k++) {
        o[c + k] = bf16_bits_to_float(xt[c + 2 * k]);
        o[c + 8 + k] = bf16_bits_to_float(xt[c + 2 * k + 1]);
      }
    for (int64_t c = full; c < cols; c++) o[c] = bf16_bits_to_float(xt[c]);
  }
}

// R dense bf16 rows of W against TT tokens of x laid out by dense_x_avx2, side by side as dense_rows does:
// 16 columns per step, the even ones by a 16-bit shift of each 32-bit lane, the odd ones by masking the low half.
template <int R, int TT>
SPARSELM_AVX2 inline void dense_rows_avx2(const uint16_t* W, int64_t cols, const float* x, int64_t r,
                                          float (&out)[R][TT]) {
  const int64_t full = cols & ~int64_t(15);
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  __m256 acc[R][TT];
  #pragma GCC unroll 8
  for (int i = 0; i < R; i++) for (int t = 0; t < TT; t++) acc[i][t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; c += 16) {
    __m256 xe[TT], xo[TT];
    #pragma GCC unroll 8
    for (int t = 0; t < TT; t++) {
      xe[t] = _mm256_loadu_ps(x + t * cols + c);
      xo[t] = _mm256_loadu_ps(x + t * cols + c + 8);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
      const uint16_t* w = W + (r + i) * cols;
      if ((c & 31) == 0) prefetch_at(w, 2 * c + kPrefetchBytes);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      #pragma GCC unroll 8
      for (int t = 0; t < TT; t++) {
        acc[i][t] = _mm256_fmadd_ps(even, xe[t], acc[i][t]);
        acc[i][t] = _mm256_fmadd_ps(odd, xo[t], acc[i][t]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int i = 0; i < R; i++) for (int t = 0; t < TT; t++) {
    float s = hsum8(acc[i][t]);
    for (int64_t c = full; c < cols; c++) s += bf16_bits_to_float(W[(r + i) * cols + c]) * x[t * cols + c];
    out[i][t] = s;
  }
}

// the best level this CPU runs: 2 AVX-512 (F, BW, VL, DQ, VBMI, VBMI2, BF16), 1 AVX2 + FMA + F16C, 0 neither
int64_t cpu_level() {
  static const int64_t level =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
      __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16") ? 2
      : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt") ? 1 : 0);
  return level;
}

Masked view(const torch::Tensor& mask, const torch::Tensor& offsets, const torch::Tensor& values, int64_t kind,
            const c10::optional<torch::Tensor>& scale, int64_t rows, int64_t cols,
            const c10::optional<torch::Tensor>& zero = c10::nullopt, int64_t group = 0, int64_t block = 0) {
  TORCH_CHECK(mask.is_contiguous() && mask.scalar_type() == torch::kUInt8, "mask: contiguous uint8");
  TORCH_CHECK(offsets.is_contiguous() && offsets.scalar_type() == torch::kInt64 && offsets.numel() == rows + 1,
              "offsets: contiguous int64 (rows+1,)");
  TORCH_CHECK(values.is_contiguous(), "values: contiguous");
  TORCH_CHECK(block >= 0 && (block == 0 || (cols % block == 0 && mask.numel() * 8 >= rows * (cols / block))),
              "blocks: a width dividing cols and one mask bit per block");
  TORCH_CHECK(block || mask.numel() == 0 || mask.numel() * 8 >= rows * cols, "mask too short");  // empty: all kept
  TORCH_CHECK(kind != INT8 || (scale.has_value() && scale->scalar_type() == torch::kFloat32 &&
              scale->is_contiguous() && scale->numel() == rows), "int8 values need a float32 scale (rows,)");
  TORCH_CHECK(0 <= kind && kind <= INT4, "value kind");
  Masked m{mask.numel() ? mask.data_ptr<uint8_t>() : nullptr, mask.numel(), offsets.data_ptr<int64_t>(),
           values.data_ptr(), int64_t(values.numel() * values.element_size()), int(kind),
           kind == INT8 ? scale->data_ptr<float>() : nullptr, rows, cols};
  if (block) {
    m.block = block; m.gpr = cols / block;
    if ((block & (block - 1)) == 0) m.block_shift = __builtin_ctzll(uint64_t(block));
  }
  if (grouped(int(kind))) {
    TORCH_CHECK(group >= 0 && (!block || group == block), "group >= 0 (with blocks: the block width)");
    m.group = group; m.gpr = group ? (cols + group - 1) / group : 1;
    const int64_t groups = block ? offsets[rows].item<int64_t>() / block : rows * m.gpr;
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kHalf && scale->is_contiguous() &&
                scale->numel() >= groups, "grouped values need an fp16 scale per group (rows * groups per row,)");
    m.gscale = scale->data_ptr<c10::Half>();
    if (kind == INT4) {
      TORCH_CHECK(zero.has_value() && zero->scalar_type() == torch::kUInt8 && zero->is_contiguous() &&
                  zero->numel() * 2 >= groups, "int4 values need packed 4-bit zero points per group");
      m.zero = zero->data_ptr<uint8_t>();
    }
  }
  return m;
}

}  // namespace

// the path masked_gemv and masked_unpack take for a value kind / group under the cap `isa` (2 AVX-512, 1 AVX2,
// 0 scalar): the best the CPU has at or below it whose step (16 columns for AVX-512, 8 for AVX2) lies in one
// quantization group of the grouped kinds
int64_t gemv_level(int64_t kind, int64_t group, int64_t isa) {
  const int64_t cap = std::min(isa, cpu_level());
  const bool any = !grouped(int(kind));
  if (cap >= 2 && (any || group % 16 == 0)) return 2;
  return cap >= 1 && (any || group % 8 == 0) ? 1 : 0;
}

// the dense bf16 GEMV's path under the cap `isa`: 2 AVX-512 BF16, 1 AVX2 + FMA, 0 none (then dense_gemv refuses)
int64_t dense_level(int64_t isa) { return std::max<int64_t>(0, std::min(isa, cpu_level())); }

template <typename F>
void token_blocks(int64_t T, F&& f) {  // f(t0, std::integral_constant<int, tt>) for blocks of <= 8 tokens
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    switch (std::min<int64_t>(8, T - t0)) {
      case 1: f(t0, std::integral_constant<int, 1>()); break;
      case 2: f(t0, std::integral_constant<int, 2>()); break;
      case 3: f(t0, std::integral_constant<int, 3>()); break;
      case 4: f(t0, std::integral_constant<int, 4>()); break;
      case 5: f(t0, std::integral_constant<int, 5>()); break;
      case 6: f(t0, std::integral_constant<int, 6>()); break;
      case 7: f(t0, std::integral_constant<int, 7>()); break;
      default: f(t0, std::integral_constant<int, 8>());
    }
  }
}

// chunks in flight per masked row for a block of TT tokens (TT·U accumulators stay in registers)
template <int TT> constexpr int unroll() { return TT == 1 ? 4 : (TT == 2 ? 2 : 1); }
// dense rows walked side by side for a block of TT tokens (2·R·TT accumulators; AVX2's 16 registers)
template <int TT> constexpr int rows_at_once() { return TT == 1 ? 4 : (TT <= 3 ? 2 : 1); }
// AVX-512 (32 registers): R rows side by side, U chunks of each in flight (U·R·TT accumulators + TT of x). From
// 4 tokens two rows with one chunk each: one row with two chunks loaded TT chunks of x per chunk of W
template <int TT> constexpr int dense_rows_512() { return TT == 1 ? 4 : 2; }
template <int TT> constexpr int dense_chunks_512() { return TT <= 3 ? 2 : 1; }
// from this many tokens masked rows of bf16 values are read in pairs (`gemv_row_pair`; measured: its comment)
constexpr int PAIR_MIN_TOKENS = 3;
// Values decoded in fp32 (int8, fp16, fp32) against bf16 x: rounded to bf16 for VDPBF16PS from this many tokens
// in a block on (decoding each chunk once for more tokens), else FMA'd in fp32 against x widened once. Masked
// int8 per row / per 128 inputs at 50 %, Llama-3.2-1B and -3-8B shapes, 2 threads, EPYC: VDPBF16PS was slower in 32
// of 36 rows at 1-6 tokens (0.81-1.30x the FMA time), faster in 16 of 16 at 7-8 (0.67-0.92x).
constexpr int DECODED_DP_MIN_TOKENS = 7;

// Below `serial_bytes` of weight bytes one thread does the whole product (`policy.SERIAL_BYTES`: waking a
// second thread cost more than it saved on the project's CPU).

// writes row r's results for tokens t0..t0+TT-1 into y (T, rows) of dtype `st`: acc·scale + bias
struct Store {
  void* y; torch::ScalarType st; int64_t rows; const float* bias;
  void operator()(int64_t t, int64_t r, float v, float scale) const {
    v = v * scale + (bias ? bias[r] : 0.f);
    int64_t i = t * rows + r;
    if (st == torch::kBFloat16) static_cast<c10::BFloat16*>(y)[i] = c10::BFloat16(v);
    else if (st == torch::kHalf) static_cast<c10::Half*>(y)[i] = c10::Half(v);
    else static_cast<float*>(y)[i] = v;
  }
};

torch::Tensor out_like(const torch::Tensor& x, int64_t T, int64_t rows) {
  return torch::empty({T, rows}, x.options());
}

// The products take x (..., cols) and give (..., rows): a model's (batch, seq, hidden) activations are flattened
// and the output shaped back here, not by two more trips through Python's torch calls (each costs more, cold,
// than a small layer's GEMV: docs/benchmarks/README.md, session 20).
torch::Tensor tokens_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "x: (..., cols)");
  return x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
}

torch::Tensor shaped_like(const torch::Tensor& y, const torch::Tensor& x) {
  if (x.dim() == 2) return y;
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

c10::optional<torch::Tensor> float_bias(const c10::optional<torch::Tensor>& bias, int64_t rows) {
  if (!bias.has_value()) return c10::nullopt;
  TORCH_CHECK(bias->numel() == rows, "bias: (rows,)");
  return bias->to(torch::kFloat32).contiguous();
}

// Y = X Mᵀ (+ bias) in x's dtype for few tokens: each row's compressed bytes are read once.
torch::Tensor masked_gemv(torch::Tensor x, torch::Tensor mask, torch::Tensor offsets, torch::Tensor values,
                          int64_t kind, c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> zero,
                          int64_t group, c10::optional<torch::Tensor> bias, int64_t rows, int64_t cols, int64_t isa,
                          int64_t block, int64_t serial_bytes) {
  if (x.dim() != 2)
    return shaped_like(masked_gemv(tokens_of(x), mask, offsets, values, kind, scale, zero, group, bias, rows, cols,
                                   isa, block, serial_bytes), x);
  TORCH_CHECK(x.size(1) == cols, "x: (..., cols)");
  auto st = x.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kHalf, "x dtype");
  Masked m = view(mask, offsets, values, kind, scale, rows, cols, zero, group, block);
  const int64_t T = x.size(0);
  const int64_t level = gemv_level(kind, group, isa);
  const bool avx = level == 2;
  const bool int4 = avx && st == torch::kBFloat16 && int4_direct(m), int8 = avx && int8_direct(m);
  // bf16 x meets bf16 values, 14-bit values and int4 codes (by table) in VDPBF16PS at any token count; the other
  // values (int8, fp16, fp32), decoded in fp32, are rounded to bf16 for it only in blocks of DECODED_DP_MIN_TOKENS
  // tokens or more. GQSA's blocks and mask-free int8 have their own paths.
  const bool dp = avx && st == torch::kBFloat16 && !block && !int8;
  const bool bf16_values = kind == BF16 || kind == P14 || kind == INT4;
  const int64_t rem = T % 8;  // the last token block's size (token_blocks), 0: all blocks full
  const bool fp32_x = !int4 && (!dp || (!bf16_values && rem && rem < DECODED_DP_MIN_TOKENS));
  const bool blocks = avx && blocks_direct(m);
  const int64_t ngroups = int4 ? cols / (group ? group : cols) : 0;
  auto x16 = dp || int4 ? x.contiguous() : x;  // bf16
  auto x32 = fp32_x ? x.to(torch::kFloat32).contiguous() : x;
  std::vector<uint16_t> xd(int4 ? T * cols : 0);
  std::vector<float> gsum(T * ngroups);
  if (int4)
    deinterleave64(reinterpret_cast<const uint16_t*>(x16.data_ptr<c10::BFloat16>()), T, cols, group, xd.data(),
                   gsum.data());
  auto y = out_like(x, T, rows);
  auto b = float_bias(bias, rows);
  Store store{y.data_ptr(), st, rows, b.has_value() ? b->data_ptr<float>() : nullptr};
  const int64_t grain = m.mask_bytes + m.value_bytes < serial_bytes ? rows : 16;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (level == 1) {
      const float* xp = x32.data_ptr<float>();
      token_blocks(T, [&](int64_t t0, auto tt) {
        constexpr int TT = decltype(tt)::value;
        auto rows_of = [&](auto k) {
          constexpr int K = decltype(k)::value;
          float out[TT];
          // rows whose loads all fit (all but the last few) skip the bounds check
          for (int64_t r = r0; r < r1; r++) {
            if (fits<K>(m, m.offsets[r + 1]))
              gemv_row_avx2<unroll<TT>(), TT, K, false>(m, xp + t0 * cols, r, out);
            else
              gemv_row_avx2<unroll<TT>(), TT, K, true>(m, xp + t0 * cols, r, out);
            const float s = m.scale ? m.scale[r] : 1.f;
            for (int t = 0; t < TT; t++) store(t0 + t, r, out[t], s);
          }
        };
        with_kind(int(kind), rows_of);
      });
      return;
    }
    if (!avx) {
      std::vector<float> acc(T);
      const float* xp = x32.data_ptr<float>();
      for (int64_t r = r0; r < r1; r++) {
        gemv_rows_scalar(m, xp, T, acc.data(), r);
        for (int64_t t = 0; t < T; t++) store(t, r, acc[t], m.scale ? m.scale[r] : 1.f);
      }
      return;
    }
    if (blocks) {  // GQSA blocks: the kept blocks' codes read directly (block_row)
      const float* xp = x32.data_ptr<float>();
      token_blocks(T, [&](int64_t t0, auto tt) {
        constexpr int TT = decltype(tt)::value;
        float out[TT];
        auto rows_of = [&](auto k) {
          constexpr int K = decltype(k)::value;
          for (int64_t r = r0; r < r1; r++) {
            block_row<TT, K>(m, xp + t0 * cols, r, out);
            for (int t = 0; t < TT; t++) store(t0 + t, r, out[t], 1.f);
          }
        };
        if (kind == INT4) rows_of(std::integral_constant<int, INT4>());
        else rows_of(std::integral_constant<int, INT8G>());
      });
      return;
    }
    if (int4 || int8) {  // mask-free int4 against bf16 x / int8: the codes read directly (int4_row, int8_row)
      token_blocks(T, [&](int64_t t0, auto tt) {
        constexpr int TT = decltype(tt)::value;
        float out[TT];
        for (int64_t r = r0; r < r1; r++) {
          if (int4) int4_row<TT>(m, xd.data() + t0 * cols, gsum.data() + t0 * ngroups, r, out);
          else int8_row<TT>(m, x32.data_ptr<float>() + t0 * cols, r, out);
          for (int t = 0; t < TT; t++) store(t0 + t, r, out[t], m.scale ? m.scale[r] : 1.f);
        }
      });
      return;
    }
    token_blocks(T, [&](int64_t t0, auto tt) {
      constexpr int TT = decltype(tt)::value;
      auto rows_of = [&](auto k, auto dpc) {
        constexpr int K = decltype(k)::value;
        constexpr bool DP = decltype(dpc)::value;
        const void* xp = DP ? static_cast<const void*>(x16.data_ptr<c10::BFloat16>() + t0 * cols)
                            : static_cast<const void*>(x32.data_ptr<float>() + t0 * cols);
        float out[TT], out1[TT];
        int64_t r = r0;
        if constexpr (DP && (K == BF16 || K == P14 || K == INT4) && TT >= PAIR_MIN_TOKENS)  // rows in pairs: x's loads shared
          for (; r + 1 < r1; r += 2) {
            gemv_row_pair<TT, K>(m, static_cast<const uint16_t*>(xp), r, out, out1);
            const float s0 = m.scale ? m.scale[r] : 1.f, s1 = m.scale ? m.scale[r + 1] : 1.f;
            for (int t = 0; t < TT; t++) store(t0 + t, r, out[t], s0), store(t0 + t, r + 1, out1[t], s1);
          }
        for (; r < r1; r++) {
          gemv_row<unroll<TT>(), TT, K, DP>(m, xp, r, out);
          const float s = m.scale ? m.scale[r] : 1.f;
          for (int t = 0; t < TT; t++) store(t0 + t, r, out[t], s);
        }
      };
      with_kind(int(kind), [&](auto k) {
        constexpr int K = decltype(k)::value;
        if (dp && (K == BF16 || K == P14 || K == INT4 || TT >= DECODED_DP_MIN_TOKENS)) rows_of(k, std::true_type());
        else rows_of(k, std::false_type());
      });
    });
  });
  return y;
}

// Y = X Wᵀ (+ bias) for a dense row-major bf16 W (rows, cols) and few bf16 tokens: the low-rank factors and
// dictionaries at decode (faster here than torch.mv and F.linear at M = 1..4 in bf16).
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias, int64_t serial_bytes,
                         int64_t isa) {
  if (x.dim() != 2) return shaped_like(dense_gemv(tokens_of(x), W, bias, serial_bytes, isa), x);
  const int64_t level = dense_level(isa);
  TORCH_CHECK(level > 0, "dense_gemv needs AVX-512 BF16 or AVX2 + FMA + F16C");
  TORCH_CHECK(W.dim() == 2 && x.size(1) == W.size(1), "x (..., cols), W (rows, cols)");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && W.scalar_type() == torch::kBFloat16 && W.is_contiguous(),
              "bf16 x and contiguous bf16 W");
  auto xc = x.contiguous();
  const int64_t T = x.size(0), rows = W.size(0), cols = W.size(1);
  auto y = out_like(x, T, rows);
  auto b = float_bias(bias, rows);
  Store store{y.data_ptr(), torch::kBFloat16, rows, b.has_value() ? b->data_ptr<float>() : nullptr};
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(W.data_ptr<c10::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  std::vector<float> xf(level == 1 ? T * cols : 0);  // AVX2: x as fp32 in the order its rows are read
  if (level == 1) dense_x_avx2(xp, T, cols, xf.data());
  const int64_t grain = rows * cols * 2 < serial_bytes ? rows : 16;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    token_blocks(T, [&](int64_t t0, auto tt) {
      constexpr int TT = decltype(tt)::value;
      constexpr int R = rows_at_once<TT>(), R512 = dense_rows_512<TT>(), U = dense_chunks_512<TT>();
      int64_t r = r0;
      auto emit = [&](auto rr) {
        constexpr int RR = decltype(rr)::value;
        float out[RR][TT];
        if (level == 1) dense_rows_avx2<RR, TT>(wp, cols, xf.data() + t0 * cols, r, out);
        else dense_rows<RR, TT, U>(wp, cols, xp + t0 * cols, r, out);
        for (int i = 0; i < RR; i++) for (int t = 0; t < TT; t++) store(t0 + t, r + i, out[i][t], 1.f);
        r += RR;
      };
      if (level == 1) while (r + R <= r1) emit(std::integral_constant<int, R>());
      else while (r + R512 <= r1) emit(std::integral_constant<int, R512>());
      while (r < r1) emit(std::integral_constant<int, 1>());
    });
  });
  return y;
}

// Two products in one call at decode, (X Aᵀ) then M: the low-rank factors (A = Uᵀ, M = Vᵀ dense) and the
// dictionaries (A = Dᵀ, M = Sᵀ masked). The same kernels as two calls, less one trip through Python and pybind
// (microseconds per layer, a tenth of a small layer's decode).
torch::Tensor dense_dense_gemv(torch::Tensor x, torch::Tensor A, torch::Tensor W, c10::optional<torch::Tensor> bias,
                               int64_t serial_bytes, int64_t isa) {
  return dense_gemv(dense_gemv(x, A, c10::nullopt, serial_bytes, isa), W, bias, serial_bytes, isa);
}

torch::Tensor dense_masked_gemv(torch::Tensor x, torch::Tensor A, torch::Tensor mask, torch::Tensor offsets,
                                torch::Tensor values, int64_t kind, c10::optional<torch::Tensor> scale,
                                c10::optional<torch::Tensor> zero, int64_t group, c10::optional<torch::Tensor> bias,
                                int64_t rows, int64_t cols, int64_t isa, int64_t block, int64_t serial_bytes) {
  return masked_gemv(dense_gemv(x, A, c10::nullopt, serial_bytes, isa), mask, offsets, values, kind, scale, zero,
                     group, bias, rows, cols, isa, block, serial_bytes);
}

// dense rows r0..r1-1 of M into o (row r at o + r * cols) on the path `level` (gemv_level)
template <typename OutT>
void unpack_rows(const Masked& m, int64_t level, int64_t r0, int64_t r1, OutT* o) {
  if (level == 2) unpack_rows_avx<OutT>(m, r0, r1, o);
  else if (level == 1) unpack_rows_avx2<OutT>(m, r0, r1, o);
  else unpack_rows_scalar<OutT>(m, r0, r1, o);
}

void masked_unpack(torch::Tensor mask, torch::Tensor offsets, torch::Tensor values, int64_t kind,
                   c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> zero, int64_t group,
                   int64_t rows, int64_t cols, int64_t r0, int64_t r1, torch::Tensor out, int64_t isa, int64_t block) {
  Masked m = view(mask, offsets, values, kind, scale, rows, cols, zero, group, block);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows, "row range");
  TORCH_CHECK(out.is_contiguous() && out.numel() >= (r1 - r0) * cols, "out: contiguous (r1-r0, cols)");
  const int64_t level = gemv_level(kind, group, isa);
  auto st = out.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16, "out dtype");
  at::parallel_for(r0, r1, 8, [&](int64_t b, int64_t e) {
    auto run = [&](auto* base) {  // out row 0 is matrix row r0
      auto* o = base - r0 * cols;
      unpack_rows(m, level, b, e, o);
    };
    if (st == torch::kFloat32) run(out.data_ptr<float>());
    else if (st == torch::kBFloat16) run(out.data_ptr<c10::BFloat16>());
    else run(out.data_ptr<c10::Half>());
  });
}

// Y = X Mᵀ for many tokens: each thread unpacks its own row panels into a thread-local scratch and runs a
// single-threaded dense GEMM on it (one parallel region per call; ATen ops inside it run sequentially).
torch::Tensor masked_panels_mm(torch::Tensor x, torch::Tensor mask, torch::Tensor offsets, torch::Tensor values,
                               int64_t kind, c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> zero,
                               int64_t group, int64_t rows, int64_t cols, int64_t panel_rows, int64_t isa,
                               int64_t block) {
  if (x.dim() != 2)
    return shaped_like(masked_panels_mm(tokens_of(x), mask, offsets, values, kind, scale, zero, group, rows, cols,
                                        panel_rows, isa, block), x);
  TORCH_CHECK(x.size(1) == cols, "x: (..., cols)");
  auto st = x.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16, "x dtype");
  Masked m = view(mask, offsets, values, kind, scale, rows, cols, zero, group, block);
  const int64_t level = gemv_level(kind, group, isa);
  auto y = torch::empty({x.size(0), rows}, x.options());  // row-major, each panel's columns in place (dense_panels_mm)
  int64_t npanels = (rows + panel_rows - 1) / panel_rows;
  at::parallel_for(0, npanels, 1, [&](int64_t b, int64_t e) {
    thread_local torch::Tensor scratch;
    if (!scratch.defined() || scratch.scalar_type() != st || scratch.numel() < panel_rows * cols)
      scratch = torch::empty({panel_rows * cols}, x.options());
    for (int64_t p = b; p < e; p++) {
      int64_t r0 = p * panel_rows, r1 = std::min(rows, r0 + panel_rows);
      auto run = [&](auto* base) {
        auto* o = base - r0 * cols;
        unpack_rows(m, level, r0, r1, o);
      };
      if (st == torch::kFloat32) run(scratch.data_ptr<float>());
      else if (st == torch::kBFloat16) run(scratch.data_ptr<c10::BFloat16>());
      else run(scratch.data_ptr<c10::Half>());
      auto panel = scratch.narrow(0, 0, (r1 - r0) * cols).view({r1 - r0, cols});
      auto out = y.narrow(1, r0, r1 - r0);
      at::mm_out(out, x, panel.t());
    }
  });
  return y;
}

// Y = X Wᵀ (T, rows) for a dense W and many tokens: W's rows in one contiguous range per thread, each a
// single-threaded GEMM writing its columns of a row-major Y in place (BLAS takes Y's row stride as the leading
// dimension: no copy). On the Xeon with AMX this beat F.linear's one two-thread GEMM for the low-rank and
// dictionary factors (oneDNN split (512 x 4096) x (4096 x 491) so badly that it took longer than the 4096 x 1024
// dense layer); on the EPYC without AMX one F.linear is faster (`policy.dense_panels`, docs/benchmarks/README.md).
// Row-major, not the transposed view of Yᵀ it returned until 2026-12-07: non-contiguous q/k/v send PyTorch's SDPA
// to its math path (a 50 % copy of the bundled model at 1016 tokens: 3.4x the dense forward's time, 1.16x
// row-major), and every elementwise op after the layer reads strided memory.
torch::Tensor dense_panels_mm(torch::Tensor x, torch::Tensor W) {
  if (x.dim() != 2) return shaped_like(dense_panels_mm(tokens_of(x), W), x);
  TORCH_CHECK(W.dim() == 2 && x.size(1) == W.size(1), "x (..., cols), W (rows, cols)");
  TORCH_CHECK(x.scalar_type() == W.scalar_type(), "x and W: one dtype");
  const int64_t rows = W.size(0);
  auto y = torch::empty({x.size(0), rows}, x.options());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 16));
  const int64_t step = (rows / parts + 15) / 16 * 16;  // a multiple of 16 rows, the last range the rest
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; p++) {
      int64_t r0 = std::min(rows, p * step), r1 = p + 1 == parts ? rows : std::min(rows, r0 + step);
      if (r0 >= r1) continue;
      auto out = y.narrow(1, r0, r1 - r0);
      at::mm_out(out, x, W.narrow(0, r0, r1 - r0).t());
    }
  });
  return y;
}

// Two dense products in one call beyond the GEMV's tokens, Y = (X Aᵀ) Wᵀ (+ bias): the low-rank factors at
// prefill. Each an at::linear (what F.linear runs, the same result to the bit) or, with `panels`, a dense_panels_mm.
// One trip through Python and pybind instead of two: the 0.4 factors of the 1B k/v layer at 512 tokens took
// 0.67-0.69x the dense layer's time against 0.71-0.73x for two F.linear (EPYC, 2 threads, weights cycled,
// docs/benchmarks/README.md, session 21).
torch::Tensor dense_dense_mm(torch::Tensor x, torch::Tensor A, torch::Tensor W, c10::optional<torch::Tensor> bias,
                             bool panels) {
  TORCH_CHECK(x.scalar_type() == A.scalar_type() && A.scalar_type() == W.scalar_type(), "x, A and W: one dtype");
  c10::optional<torch::Tensor> b;
  if (bias.has_value()) b = bias->to(x.scalar_type());
  if (!panels) return at::linear(at::linear(x, A), W, b);
  auto y = dense_panels_mm(dense_panels_mm(x, A), W);
  return b.has_value() ? y.add_(*b) : y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("cpu_level", &cpu_level, "the best path this CPU runs: 2 AVX-512 (VBMI2 + BF16), 1 AVX2 + FMA + F16C, 0 scalar");
  mod.def("gemv_level", &gemv_level,
          "masked_gemv's and masked_unpack's path for a value kind and group under a cap: 2 AVX-512, 1 AVX2, 0 scalar");
  mod.def("dense_level", &dense_level, "dense_gemv's path under a cap: 2 AVX-512, 1 AVX2, 0 unavailable");
  mod.def("masked_gemv", &masked_gemv, "Y = X M^T (+ bias) for a bitmask-packed matrix M, in x's dtype");
  mod.def("dense_gemv", &dense_gemv, "Y = X W^T (+ bias) for a dense bf16 W, few bf16 tokens");
  mod.def("dense_dense_gemv", &dense_dense_gemv, "Y = (X A^T) W^T (+ bias): dense_gemv twice in one call");
  mod.def("dense_masked_gemv", &dense_masked_gemv, "Y = (X A^T) M^T (+ bias): dense_gemv, then masked_gemv");
  mod.def("dense_panels_mm", &dense_panels_mm, "Y = X W^T: one single-threaded GEMM per thread over W's rows");
  mod.def("dense_dense_mm", &dense_dense_mm, "Y = (X A^T) W^T (+ bias): at::linear or dense_panels_mm twice");
  mod.def("masked_panels_mm", &masked_panels_mm, "Y = X M^T through per-thread unpacked panels + GEMM");
  mod.def("masked_unpack", &masked_unpack, "dense rows r0..r1 of a bitmask-packed matrix into out");
}

// Minimal NumPy .npy reader/writer for tests: reads format 1.0/2.0 (and 3.0, which differs only in the
// header's text encoding), writes 1.0. Little-endian C-order arrays of <f4 <f8 <i8 <i4 |u1 <f2 only.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace kvevict::test {

// Bytes are reinterpreted in place, so the host must share the file's byte order.
static_assert(std::endian::native == std::endian::little, "npy.hpp assumes a little-endian host");

struct NpyArray {
  std::string dtype;                // normalised descr: "<f4", "<f8", "<i8", "<i4", "|u1" or "<f2"
  std::vector<int64_t> shape;       // C order; empty = 0-d scalar
  std::vector<unsigned char> bytes; // raw little-endian payload, numel() * itemsize bytes

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }

  // Every element converted to T with static_cast (f2 goes through float first).
  template <class T>
  std::vector<T> as() const;
};

namespace detail {

inline int64_t npy_itemsize(const std::string& dtype) {
  if (dtype == "<f4" || dtype == "<i4") return 4;
  if (dtype == "<f8" || dtype == "<i8") return 8;
  if (dtype == "<f2") return 2;
  if (dtype == "|u1") return 1;
  return 0;  // unsupported
}

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN payload).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: shift the mantissa up until its implicit bit appears, adjusting the exponent.
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

template <class Src>
Src load_elem(const unsigned char* p) {
  Src v;
  std::memcpy(&v, p, sizeof(Src));  // payload alignment is not guaranteed, so no reinterpret_cast
  return v;
}

[[noreturn]] inline void npy_fail(const std::filesystem::path& path, const std::string& what) {
  throw std::runtime_error("npy file '" + path.string() + "': " + what);
}

// Value of a key in the header dict literal, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }.
// Returns the raw text after the colon (trimmed, up to the matching ',' or closing bracket).
inline std::string header_value(const std::string& header, const std::string& key,
                                const std::filesystem::path& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) k = header.find("\"" + key + "\"");
  if (k == std::string::npos) npy_fail(path, "header lacks key '" + key + "': " + header);
  size_t i = header.find(':', k + key.size() + 2);
  if (i == std::string::npos) npy_fail(path, "malformed header: " + header);
  ++i;
  while (i < header.size() && header[i] == ' ') ++i;
  if (i >= header.size()) npy_fail(path, "malformed header: " + header);
  size_t end;
  if (header[i] == '(') {
    end = header.find(')', i);
    if (end == std::string::npos) npy_fail(path, "unterminated shape tuple: " + header);
    ++end;
  } else if (header[i] == '\'' || header[i] == '"') {
    end = header.find(header[i], i + 1);
    if (end == std::string::npos) npy_fail(path, "unterminated string: " + header);
    ++end;
  } else {
    end = header.find_first_of(",}", i);
    if (end == std::string::npos) npy_fail(path, "malformed header: " + header);
  }
  std::string v = header.substr(i, end - i);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

inline std::vector<int64_t> parse_shape(const std::string& tuple, const std::filesystem::path& path) {
  // tuple is "()", "(8,)" or "(1, 2, 3)".
  std::vector<int64_t> shape;
  size_t i = 1;
  while (i + 1 < tuple.size()) {
    while (i < tuple.size() && (tuple[i] == ' ' || tuple[i] == ',')) ++i;
    if (i + 1 >= tuple.size()) break;
    size_t j = i;
    while (j < tuple.size() && tuple[j] >= '0' && tuple[j] <= '9') ++j;
    if (j == i || j - i > 18) npy_fail(path, "bad shape " + tuple);
    shape.push_back(std::stoll(tuple.substr(i, j - i)));
    i = j;
  }
  return shape;
}

inline std::string normalise_descr(std::string d, const std::filesystem::path& path) {
  if (d.size() != 3) npy_fail(path, "unsupported dtype '" + d + "'");
  // One-byte types have no byte order; numpy writes '|' but '<' / '=' are harmless.
  if (d.substr(1) == "u1") return "|u1";
  if (d[0] == '=') d[0] = '<';
  if (npy_itemsize(d) == 0 || d[0] != '<') npy_fail(path, "unsupported dtype '" + d + "' (need <f4 <f8 <i8 <i4 |u1 <f2)");
  return d;
}

inline std::string shape_tuple(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  if (shape.size() == 1) s += ",";  // Python's one-element tuple
  return s + ")";
}

// Writes dtype/shape/payload with the given format major version (1 or 2; 2 only exists for testing the reader).
inline void write_npy_raw(const std::filesystem::path& path, const std::string& dtype,
                          const std::vector<int64_t>& shape, const void* data, size_t nbytes, int major = 1) {
  if (npy_itemsize(dtype) == 0) npy_fail(path, "cannot write unsupported dtype '" + dtype + "'");
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) npy_fail(path, "negative dimension in shape " + shape_tuple(shape));
    n *= d;
  }
  if (static_cast<uint64_t>(n * npy_itemsize(dtype)) != nbytes) npy_fail(path, "payload size does not match shape");
  if (major != 1 && major != 2) npy_fail(path, "can only write format 1.0 or 2.0");

  std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': " + shape_tuple(shape) + ", }";
  // numpy pads with spaces and a final '\n' so that the payload starts on a 64-byte boundary.
  const size_t prefix = 6 + 2 + (major == 1 ? 2 : 4);
  const size_t total = (prefix + header.size() + 1 + 63) / 64 * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header.push_back('\n');
  if (major == 1 && header.size() > 0xffff) npy_fail(path, "header too long for format 1.0");

  std::string out = "\x93NUMPY";
  out.push_back(static_cast<char>(major));
  out.push_back('\0');
  const uint32_t hlen = static_cast<uint32_t>(header.size());
  for (size_t b = 0; b < prefix - 8; ++b) out.push_back(static_cast<char>((hlen >> (8 * b)) & 0xffu));
  out += header;

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) npy_fail(path, "cannot open for writing");
  f.write(out.data(), static_cast<std::streamsize>(out.size()));
  if (nbytes) f.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!f) npy_fail(path, "write failed");
}

template <class T>
constexpr const char* npy_descr_of() {
  if constexpr (std::is_same_v<T, float>) return "<f4";
  else if constexpr (std::is_same_v<T, double>) return "<f8";
  else if constexpr (std::is_same_v<T, int64_t>) return "<i8";
  else if constexpr (std::is_same_v<T, int32_t>) return "<i4";
  else if constexpr (std::is_same_v<T, uint8_t>) return "|u1";
  else static_assert(!sizeof(T), "save_npy supports float, double, int64_t, int32_t and uint8_t");
}

}  // namespace detail

template <class T>
std::vector<T> NpyArray::as() const {
  static_assert(std::is_arithmetic_v<T>, "NpyArray::as<T> needs an arithmetic T");
  const int64_t n = numel();
  const int64_t isz = detail::npy_itemsize(dtype);
  if (isz == 0) throw std::runtime_error("NpyArray::as: unsupported dtype '" + dtype + "'");
  if (static_cast<int64_t>(bytes.size()) != n * isz)
    throw std::runtime_error("NpyArray::as: payload has " + std::to_string(bytes.size()) + " bytes, shape needs " +
                             std::to_string(n * isz));
  std::vector<T> out(static_cast<size_t>(n));
  const unsigned char* p = bytes.data();
  for (int64_t i = 0; i < n; ++i, p += isz) {
    T& o = out[static_cast<size_t>(i)];
    if (dtype == "<f4") o = static_cast<T>(detail::load_elem<float>(p));
    else if (dtype == "<f8") o = static_cast<T>(detail::load_elem<double>(p));
    else if (dtype == "<i8") o = static_cast<T>(detail::load_elem<int64_t>(p));
    else if (dtype == "<i4") o = static_cast<T>(detail::load_elem<int32_t>(p));
    else if (dtype == "|u1") o = static_cast<T>(*p);
    else o = static_cast<T>(detail::half_to_float(detail::load_elem<uint16_t>(p)));
  }
  return out;
}

inline NpyArray load_npy(const std::filesystem::path& path) {
  using detail::npy_fail;
  std::ifstream f(path, std::ios::binary);
  if (!f) npy_fail(path, "cannot open for reading");
  const std::vector<unsigned char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());

  if (raw.size() < 10 || std::memcmp(raw.data(), "\x93NUMPY", 6) != 0) npy_fail(path, "not an npy file (bad magic)");
  const int major = raw[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = raw[8] | (static_cast<size_t>(raw[9]) << 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (raw.size() < 12) npy_fail(path, "truncated header");
    hlen = 0;
    for (int b = 0; b < 4; ++b) hlen |= static_cast<size_t>(raw[8 + b]) << (8 * b);
    hstart = 12;
  } else {
    npy_fail(path, "unsupported format version " + std::to_string(major) + "." + std::to_string(raw[7]));
  }
  if (raw.size() < hstart + hlen) npy_fail(path, "truncated header");
  const std::string header(raw.begin() + static_cast<std::ptrdiff_t>(hstart),
                           raw.begin() + static_cast<std::ptrdiff_t>(hstart + hlen));

  NpyArray a;
  std::string descr = detail::header_value(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"'))
    npy_fail(path, "descr is not a simple dtype string: " + descr);
  a.dtype = detail::normalise_descr(descr.substr(1, descr.size() - 2), path);
  const std::string fortran = detail::header_value(header, "fortran_order", path);
  if (fortran == "True") npy_fail(path, "fortran_order=True is not supported (C order only)");
  if (fortran != "False") npy_fail(path, "bad fortran_order value '" + fortran + "'");
  const std::string shape = detail::header_value(header, "shape", path);
  if (shape.empty() || shape.front() != '(') npy_fail(path, "bad shape '" + shape + "'");
  a.shape = detail::parse_shape(shape, path);

  // Guard the byte count against overflow before comparing with the file size.
  const uint64_t isz = static_cast<uint64_t>(detail::npy_itemsize(a.dtype));
  uint64_t need = isz;
  for (int64_t d : a.shape) {
    if (d != 0 && need > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d))
      npy_fail(path, "shape " + shape + " overflows");
    need *= static_cast<uint64_t>(d);
  }
  const uint64_t have = raw.size() - hstart - hlen;
  if (have != need)
    npy_fail(path, "payload has " + std::to_string(have) + " bytes, dtype " + a.dtype + " shape " + shape + " needs " +
                       std::to_string(need));
  a.bytes.assign(raw.begin() + static_cast<std::ptrdiff_t>(hstart + hlen), raw.end());
  return a;
}

// Writes a format 1.0 file. T is float, double, int64_t, int32_t or uint8_t; shape is C order.
template <class T>
void save_npy(const std::filesystem::path& path, const T* data, const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  detail::write_npy_raw(path, detail::npy_descr_of<T>(), shape, data, static_cast<size_t>(n < 0 ? 0 : n) * sizeof(T));
}

template <class T>
void save_npy(const std::filesystem::path& path, const std::vector<T>& data, const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  if (n != static_cast<int64_t>(data.size()))
    detail::npy_fail(path, "vector has " + std::to_string(data.size()) + " elements, shape needs " + std::to_string(n));
  save_npy(path, data.data(), shape);
}

}  // namespace kvevict::test

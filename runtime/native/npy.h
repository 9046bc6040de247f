// Minimal reader and writer for NumPy's .npy format (versions 1.0, 2.0, 3.0).
//
// Only what the edge runner exchanges: little-endian float32 and int64 arrays
// in C order. Anything else is refused with a message that names the file and
// what was found, because a silently misread tensor produces plausible-looking
// wrong predictions. Format reference: numpy/lib/format.py.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace flywheel {
namespace npy {

enum class DType { Float32, Int64 };

inline const char* descr(DType t) { return t == DType::Float32 ? "<f4" : "<i8"; }
inline std::size_t item_bytes(DType t) { return t == DType::Float32 ? 4 : 8; }

struct Array {
  DType dtype = DType::Float32;
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;  // raw little-endian element bytes

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

inline bool host_is_little_endian() {
  const uint16_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

inline std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

// The value text for `key` in the header's Python dict literal. The header is
// written by numpy (or a compatible writer), so a small scanner is enough; it
// still refuses rather than guesses when the text does not have the shape.
inline std::string dict_value(const std::string& header, const std::string& key,
                              const std::string& where) {
  const std::string quoted[2] = {"'" + key + "'", "\"" + key + "\""};
  std::size_t pos = std::string::npos;
  for (const auto& q : quoted) {
    pos = header.find(q);
    if (pos != std::string::npos) {
      pos += q.size();
      break;
    }
  }
  if (pos == std::string::npos)
    throw Error(where + ": header has no '" + key + "' entry: " + header);
  pos = header.find(':', pos);
  if (pos == std::string::npos) throw Error(where + ": malformed header: " + header);
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  if (pos >= header.size()) throw Error(where + ": malformed header: " + header);
  std::size_t end;
  if (header[pos] == '(') {
    end = header.find(')', pos);
    if (end == std::string::npos) throw Error(where + ": malformed shape in header: " + header);
    ++end;
  } else if (header[pos] == '\'' || header[pos] == '"') {
    end = header.find(header[pos], pos + 1);
    if (end == std::string::npos) throw Error(where + ": malformed header: " + header);
    ++end;
  } else {
    end = header.find_first_of(",}", pos);
    if (end == std::string::npos) throw Error(where + ": malformed header: " + header);
  }
  return trim(header.substr(pos, end - pos));
}

inline std::vector<int64_t> parse_shape(const std::string& text, const std::string& where) {
  // text is "(a, b, ...)"; "()" is a scalar and "(n,)" a vector.
  std::vector<int64_t> shape;
  std::string body = trim(text.substr(1, text.size() - 2));
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item = trim(item);
    if (item.empty()) continue;  // the trailing comma of a 1-tuple
    // numpy may write Python 2 longs ("3L") in old files.
    if (item.back() == 'L') item.pop_back();
    std::size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v < 0)
      throw Error(where + ": bad dimension '" + item + "' in shape " + text);
    shape.push_back(static_cast<int64_t>(v));
  }
  return shape;
}

inline DType parse_descr(const std::string& quoted, const std::string& where) {
  const std::string d = quoted.size() >= 2 ? quoted.substr(1, quoted.size() - 2) : quoted;
  if (d == "<f4" || d == "=f4") return DType::Float32;
  if (d == "<i8" || d == "=i8") return DType::Int64;
  if (!d.empty() && d[0] == '>')
    throw Error(where + ": big-endian data ('" + d +
                "') is not supported; save it little-endian, e.g. arr.astype('<f4')");
  throw Error(where + ": dtype '" + d +
              "' is not supported; use float32 ('<f4') or int64 ('<i8')");
}

}  // namespace detail

// Reads `path`; throws npy::Error naming the file on anything it cannot read
// exactly (wrong magic, unknown version, Fortran order, unsupported dtype,
// truncated or oversized payload).
inline Array load(const std::string& path) {
  // Payload bytes are handed to the runtime as they are.
  if (!detail::host_is_little_endian())
    throw Error(path + ": this reader only supports little-endian hosts");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open file");
  char magic[8] = {};
  in.read(magic, 8);
  if (in.gcount() != 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    throw Error(path + ": not a .npy file (missing the \\x93NUMPY magic)");
  const int major = static_cast<unsigned char>(magic[6]);
  const int minor = static_cast<unsigned char>(magic[7]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2] = {};
    in.read(reinterpret_cast<char*>(b), 2);
    if (in.gcount() != 2) throw Error(path + ": truncated header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4] = {};
    in.read(reinterpret_cast<char*>(b), 4);
    if (in.gcount() != 4) throw Error(path + ": truncated header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw Error(path + ": unsupported .npy format version " + std::to_string(major) + "." +
                std::to_string(minor) + " (1.0, 2.0 and 3.0 are supported)");
  }
  if (header_len > (1u << 24)) throw Error(path + ": implausible header length");
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (static_cast<uint32_t>(in.gcount()) != header_len) throw Error(path + ": truncated header");

  Array arr;
  arr.dtype = detail::parse_descr(detail::dict_value(header, "descr", path), path);
  const std::string fortran = detail::dict_value(header, "fortran_order", path);
  if (fortran == "True")
    throw Error(path + ": Fortran-ordered arrays are not supported; save with "
                       "np.ascontiguousarray(arr)");
  if (fortran != "False") throw Error(path + ": bad fortran_order '" + fortran + "'");
  const std::string shape = detail::dict_value(header, "shape", path);
  if (shape.empty() || shape.front() != '(' || shape.back() != ')')
    throw Error(path + ": bad shape '" + shape + "'");
  arr.shape = detail::parse_shape(shape, path);

  // Overflow-checked byte count: a forged header must not trigger a huge
  // allocation before the size check against the file catches it.
  uint64_t count = 1;
  for (int64_t d : arr.shape) {
    if (d != 0 && count > UINT64_MAX / static_cast<uint64_t>(d))
      throw Error(path + ": shape " + shape + " is too large");
    count *= static_cast<uint64_t>(d);
  }
  // The byte count must not wrap either, and numel() is an int64_t.
  const uint64_t item = item_bytes(arr.dtype);
  if (count > static_cast<uint64_t>(INT64_MAX) / item)
    throw Error(path + ": shape " + shape + " is too large");
  const uint64_t nbytes = count * item;
  const std::streampos data_start = in.tellg();
  in.seekg(0, std::ios::end);
  const uint64_t available = static_cast<uint64_t>(in.tellg() - data_start);
  if (available != nbytes)
    throw Error(path + ": payload is " + std::to_string(available) + " bytes but shape " + shape +
                " of " + descr(arr.dtype) + " needs " + std::to_string(nbytes));
  in.seekg(data_start);
  arr.data.resize(static_cast<std::size_t>(nbytes));
  if (nbytes) in.read(reinterpret_cast<char*>(arr.data.data()), static_cast<std::streamsize>(nbytes));
  if (!in) throw Error(path + ": read failed");
  return arr;
}

// Writes a version 1.0 file, which every numpy can read.
inline void save(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
                 const void* data, std::size_t nbytes) {
  std::string dict = std::string("{'descr': '") + descr(dtype) +
                     "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  // The spec pads the header with spaces and a newline so that the payload
  // starts on a 64-byte boundary (10 = magic 6 + version 2 + length 2).
  const std::size_t unpadded = 10 + dict.size() + 1;
  const std::size_t total = (unpadded + 63) / 64 * 64;
  dict.append(total - unpadded, ' ');
  dict += '\n';
  if (dict.size() > 65535) throw Error(path + ": header too long for format 1.0");

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(path + ": cannot create file");
  const unsigned char len[2] = {static_cast<unsigned char>(dict.size() & 0xff),
                                static_cast<unsigned char>(dict.size() >> 8)};
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) throw Error(path + ": write failed");
}

}  // namespace npy
}  // namespace flywheel

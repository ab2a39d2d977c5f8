// Package safetensors reads and writes Hugging Face safetensors checkpoints.
//
// It owns the file format and nothing else: the dtype table, header parsing
// and validation, memory-mapped read-only access to one file ([File]), a
// checkpoint made of one file or of shards listed in a
// model.safetensors.index.json ([Checkpoint]), range reads along one
// dimension for tensor-parallel shard loading ([File.ReadSlice]), dtype
// conversion to float32 and int64, and a writer ([Write], [WriteFile]).
// It imports only the standard library and nothing of the project, so the
// model, shard and backend packages can all depend on it.
//
// # File format
//
// A file is an 8-byte little-endian header length N, N bytes of JSON header,
// then the data section. The header maps each tensor name to its dtype,
// shape and [begin, end) byte offsets into the data section; the optional
// key "__metadata__" holds string-to-string metadata. Tensors are stored
// row-major and little-endian. Gaps between tensors are allowed; overlaps
// are not.
//
// # Errors
//
// Errors carry the file and tensor they concern and wrap one of the
// sentinels [ErrTruncated], [ErrInvalidHeader], [ErrNotFound] or
// [ErrDuplicate]; test for them with errors.Is.
//
// # Ownership
//
// [File.ReadAll] may return a slice of the file's memory mapping: it is
// read-only and valid only until the file is closed. [File.ReadSlice] always
// returns a fresh slice.
package safetensors

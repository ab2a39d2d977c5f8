package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Well-known file names in a checkpoint directory.
const (
	IndexFile  = "model.safetensors.index.json" // lists the shards of a sharded checkpoint
	SingleFile = "model.safetensors"            // the file of an unsharded checkpoint
)

// Checkpoint is a set of files, each tensor name in exactly one of them. Its
// methods may be called from several goroutines at once, but not
// concurrently with Close.
type Checkpoint struct {
	files  []*File
	byName map[string]*File
	names  []string // sorted
}

// OpenCheckpoint opens the checkpoint at path, which is a .safetensors file
// or a directory. In a directory it opens every shard named in the
// weight_map of IndexFile and checks that each mapped tensor is in its
// shard; without an index it opens SingleFile. Tensors of a shard that the
// index does not mention are still part of the checkpoint.
func OpenCheckpoint(path string) (*Checkpoint, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if !st.IsDir() {
		f, err := Open(path)
		if err != nil {
			return nil, err
		}
		return NewCheckpoint(f)
	}
	index := filepath.Join(path, IndexFile)
	data, err := os.ReadFile(index)
	if errors.Is(err, fs.ErrNotExist) {
		single := filepath.Join(path, SingleFile)
		if _, err := os.Stat(single); errors.Is(err, fs.ErrNotExist) {
			return nil, &fileError{path, fmt.Errorf("no %s or %s in directory: %w", IndexFile, SingleFile, fs.ErrNotExist)}
		}
		return OpenCheckpoint(single)
	}
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	return openIndexed(path, index, data)
}

// openIndexed opens the shards in dir that the index file lists.
func openIndexed(dir, index string, data []byte) (_ *Checkpoint, err error) {
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(data, &idx); err != nil {
		return nil, &fileError{index, fmt.Errorf("parsing index: %w", err)}
	}
	if len(idx.WeightMap) == 0 {
		return nil, &fileError{index, errors.New("index has an empty weight_map")}
	}
	shards := make(map[string]*File)
	defer func() {
		if err != nil {
			for _, f := range shards {
				f.Close()
			}
		}
	}()
	for _, name := range slices.Compact(slices.Sorted(maps.Values(idx.WeightMap))) {
		if !filepath.IsLocal(name) || strings.ContainsAny(name, `/\`) {
			return nil, &fileError{index, fmt.Errorf("shard name %q is not a file in the checkpoint directory", name)}
		}
		f, err := Open(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		shards[name] = f
	}
	for _, tensor := range slices.Sorted(maps.Keys(idx.WeightMap)) {
		name := idx.WeightMap[tensor]
		if _, err := shards[name].Info(tensor); err != nil {
			return nil, &fileError{index, fmt.Errorf("%w: %q, which the index maps to %s", ErrNotFound, tensor, name)}
		}
	}
	files := make([]*File, 0, len(shards))
	for _, name := range slices.Sorted(maps.Keys(shards)) {
		files = append(files, shards[name])
	}
	return NewCheckpoint(files...)
}

// NewCheckpoint makes a checkpoint of files, which must not share a tensor
// name (the error wraps ErrDuplicate). The checkpoint takes ownership of the
// files and closes them in Close; on error they stay the caller's to close.
func NewCheckpoint(files ...*File) (*Checkpoint, error) {
	c := &Checkpoint{files: files, byName: make(map[string]*File)}
	for _, f := range files {
		for _, t := range f.tensors {
			if other, ok := c.byName[t.Name]; ok {
				return nil, fmt.Errorf("%w: %q is in both %s and %s", ErrDuplicate, t.Name, other.name, f.name)
			}
			c.byName[t.Name] = f
			c.names = append(c.names, t.Name)
		}
	}
	slices.Sort(c.names)
	return c, nil
}

// Names returns the names of all tensors, sorted.
func (c *Checkpoint) Names() []string { return slices.Clone(c.names) }

// Has reports whether the checkpoint has a tensor called name.
func (c *Checkpoint) Has(name string) bool {
	_, ok := c.byName[name]
	return ok
}

// Info returns the tensor called name, or an error wrapping ErrNotFound.
func (c *Checkpoint) Info(name string) (TensorInfo, error) {
	f, err := c.file(name)
	if err != nil {
		return TensorInfo{}, err
	}
	return f.Info(name)
}

// ReadAll returns the bytes of the tensor called name; see File.ReadAll. The
// slice may be part of a memory mapping: it must not be modified and is
// valid only until Close.
func (c *Checkpoint) ReadAll(name string) ([]byte, error) {
	f, err := c.file(name)
	if err != nil {
		return nil, err
	}
	return f.ReadAll(name)
}

// ReadSlice reads index ranges of the tensor called name along dimension
// dim; see File.ReadSlice.
func (c *Checkpoint) ReadSlice(name string, dim int, ranges ...Range) ([]byte, []int, error) {
	f, err := c.file(name)
	if err != nil {
		return nil, nil, err
	}
	return f.ReadSlice(name, dim, ranges...)
}

// Close closes every file of the checkpoint and returns the first error. It
// is idempotent.
func (c *Checkpoint) Close() error {
	var first error
	for _, f := range c.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (c *Checkpoint) file(name string) (*File, error) {
	f, ok := c.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return f, nil
}

// Float32s reads a whole tensor of any float or integer dtype as float32 values, with its shape.
func (c *Checkpoint) Float32s(name string) ([]float32, []int, error) {
	info, err := c.Info(name)
	if err != nil {
		return nil, nil, err
	}
	data, err := c.ReadAll(name)
	if err != nil {
		return nil, nil, err
	}
	out := make([]float32, info.NumElements())
	if err := ToFloat32(info.DType, data, out); err != nil {
		return nil, nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return out, info.Shape, nil
}

// Int64s reads a whole integer tensor (token ids) as int64 values, with its shape.
func (c *Checkpoint) Int64s(name string) ([]int64, []int, error) {
	info, err := c.Info(name)
	if err != nil {
		return nil, nil, err
	}
	data, err := c.ReadAll(name)
	if err != nil {
		return nil, nil, err
	}
	out, err := ToInt64(info.DType, data)
	if err != nil {
		return nil, nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return out, info.Shape, nil
}

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/backend"
)

// Launch geometry and limits of the sampling kernels (sample.cu).
const (
	sampleThreads = 1024 // SAMPLE_THREADS: one block a row
	// sampleParamBytes is the size of sample.cu's smp_params.
	sampleParamBytes = 32
	// sampleMaxVocab bounds V: weights are 40-bit fixed point summed in 64 bits.
	sampleMaxVocab = 1 << 23
)

var _ backend.Sampler = (*Backend)(nil)

// Sample implements backend.Sampler on the device (sample.cu): one block of 1024 threads a row, reading
// the logits where they are (float32 or bf16) and writing one int32 id a row; downloading the ids is the
// call's only wait for the GPU. When every row is greedy, sample_argmax runs and nothing is uploaded;
// otherwise the rows' settings go up in one 32-byte record each and sample_rows runs. Usually two passes
// over a row suffice (its candidates down to a bound gathered and sorted in shared memory); large top-k,
// large nuclei and draws beyond the gathered candidates fall back to radix selects over the row, exact
// as well: top-p over the whole vocabulary has no candidate cap. Weights are float32 exp in 40-bit fixed
// point, so every sum is an exact integer and the result depends only on the row and its settings; the
// backend.SampleTolerance slack covers float32 exp and weights below 2^-40 counting as 0.
func (b *Backend) Sample(logits backend.Tensor, rows []backend.SampleRow) ([]int, error) {
	lt, err := b.asTensor("sample", "logits", logits)
	if err != nil {
		return nil, err
	}
	n, v, err := backend.CheckSample(lt.shape, rows)
	if err != nil {
		return nil, fmt.Errorf("cuda: %w", err)
	}
	if v > sampleMaxVocab {
		return nil, fmt.Errorf("cuda: sample logits%v: vocabulary above %d: %w", lt.shape, sampleMaxVocab, backend.ErrShape)
	}
	if n == 0 {
		return []int{}, nil
	}
	out, err := b.pool.get(4 * int64(n))
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*out) // after the download below, which waits for the kernel
	grid, block := dim3{uint32(n), 1, 1}, dim3{sampleThreads, 1, 1}
	greedy := true
	for _, r := range rows {
		greedy = greedy && r.Greedy()
	}
	if greedy {
		err = b.stream.launch(b.k.sampleArgmax, grid, block, 0, lt, int(lt.dt), v, out)
	} else {
		var pbuf *buffer
		if pbuf, err = b.temp(sampleParams(rows)); err != nil {
			return nil, err
		}
		err = b.stream.launch(b.k.sampleRows, grid, block, 0, lt, int(lt.dt), v, pbuf, out)
		b.pool.release(*pbuf) // stream order keeps it until the kernel has read it
	}
	if err != nil {
		return nil, fmt.Errorf("cuda: sample: %w", err)
	}
	raw := make([]byte, 4*n)
	if err := b.download(raw, out.ptr); err != nil {
		return nil, fmt.Errorf("cuda: sample: %w", err)
	}
	ids := make([]int, n)
	for i := range ids {
		ids[i] = int(int32(binary.LittleEndian.Uint32(raw[4*i:])))
		if ids[i] < 0 || ids[i] >= v {
			return nil, fmt.Errorf("cuda: sample: row %d: the kernel chose id %d outside [0, %d)", i, ids[i], v)
		}
	}
	return ids, nil
}

// sampleParams packs rows as sample.cu's smp_params: u and top_p (float64), 1/temperature (float32),
// top_k, greedy and padding (int32), little-endian. A top-k beyond int32 means no top-k.
func sampleParams(rows []backend.SampleRow) []byte {
	le := binary.LittleEndian
	out := make([]byte, sampleParamBytes*len(rows))
	for i, r := range rows {
		p := out[sampleParamBytes*i:]
		le.PutUint64(p[0:], math.Float64bits(r.U))
		le.PutUint64(p[8:], math.Float64bits(r.TopP))
		var inv float32
		if !r.Greedy() {
			inv = float32(1 / r.Temperature)
		}
		le.PutUint32(p[16:], math.Float32bits(inv))
		k := r.TopK
		if k > math.MaxInt32 {
			k = 0
		}
		le.PutUint32(p[20:], uint32(int32(k)))
		if r.Greedy() {
			le.PutUint32(p[24:], 1)
		}
	}
	return out
}

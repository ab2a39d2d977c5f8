package worker

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// chunkList is a ReadTensor stream from a list of chunks, ending with err (io.EOF: a clean end).
type chunkList struct {
	grpc.ClientStream
	chunks []*tpfleetv1.TensorChunk
	err    error
}

func (c *chunkList) Recv() (*tpfleetv1.TensorChunk, error) {
	if len(c.chunks) == 0 {
		return nil, c.err
	}
	ch := c.chunks[0]
	c.chunks = c.chunks[1:]
	return ch, nil
}

func (c *chunkList) Header() (metadata.MD, error) { return nil, nil }

// collect is a chunkSender that keeps what it is sent.
type collect struct{ chunks []*tpfleetv1.TensorChunk }

func (c *collect) Send(ch *tpfleetv1.TensorChunk) error {
	c.chunks = append(c.chunks, ch)
	return nil
}

// TestFetchResumes: a read from a peer survives a stream that breaks and a chunk whose CRC is wrong: it
// resumes from the last good byte each time and checks the whole against its SHA-256.
func TestFetchResumes(t *testing.T) {
	data := make([]byte, 10_000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	var offsets []int64
	call := 0
	open := func(_ context.Context, req *tpfleetv1.ReadTensorRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[tpfleetv1.TensorChunk], error) {
		call++
		offsets = append(offsets, req.GetOffset())
		var c collect
		if err := sendChunks(&c, data, []int{100, 100}, req.GetOffset(), 1024); err != nil {
			return nil, err
		}
		switch call {
		case 1: // breaks after three chunks
			return &chunkList{chunks: c.chunks[:3], err: errors.New("connection reset")}, nil
		case 2: // the second chunk arrives damaged
			good := c.chunks[1]
			bad := &tpfleetv1.TensorChunk{Offset: good.GetOffset(), Data: bytes.Clone(good.GetData()), Crc32C: good.GetCrc32C()}
			bad.Data[0] ^= 0xff
			c.chunks[1] = bad
		}
		return &chunkList{chunks: c.chunks, err: io.EOF}, nil
	}
	got, shape, streams, err := fetch(context.Background(), open, &tpfleetv1.ReadTensorRequest{Name: "w"})
	if err != nil || !bytes.Equal(got, data) || len(shape) != 2 || shape[0] != 100 {
		t.Fatalf("fetch = %d bytes, shape %v, %v; want the %d bytes, shape [100 100]", len(got), shape, err, len(data))
	}
	if want := []int64{0, 3 * 1024, 4 * 1024}; streams != 3 || len(offsets) != 3 || offsets[1] != want[1] || offsets[2] != want[2] {
		t.Errorf("fetch took %d streams from offsets %v, want 3 from %v", streams, offsets, want)
	}

	// A peer that always breaks: the read fails after fetchAttempts streams, naming the last error.
	open = func(_ context.Context, req *tpfleetv1.ReadTensorRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[tpfleetv1.TensorChunk], error) {
		return &chunkList{err: errors.New("connection reset")}, nil
	}
	if _, _, _, err := fetch(context.Background(), open, &tpfleetv1.ReadTensorRequest{Name: "w"}); err == nil {
		t.Errorf("fetch from a peer that always breaks = nil error, want one")
	}
}

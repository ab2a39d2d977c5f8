package tpgroup

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// Dir is a Rendezvous in a directory shared by the group's processes (what `--rank R --rdzv DIR` uses,
// like torchrun's file store): rank r's record is the file rank-<r>.json and rank 0's NCCL unique id
// the file nccl-id, each written to a temporary file and renamed, so that readers never see part of
// one. Records must be JSON (Join's are): a file that is not tells of a directory of another run. Use
// a fresh directory per run. Waits poll the directory every PollInterval.
type Dir string

// PollInterval is how often Dir's waits look at the directory.
const PollInterval = 20 * time.Millisecond

var _ Rendezvous = Dir("")

// String returns the directory.
func (d Dir) String() string { return string(d) }

// file is the name of rank's record.
func (d Dir) file(rank int) string {
	return filepath.Join(string(d), "rank-"+strconv.Itoa(rank)+".json")
}

// idFile is the name of rank 0's NCCL unique id.
func (d Dir) idFile() string { return filepath.Join(string(d), "nccl-id") }

// Exchange writes rec as rank's file (creating the directory) and waits until every rank's is there.
func (d Dir) Exchange(ctx context.Context, rank, size int, rec []byte) ([][]byte, error) {
	if err := os.MkdirAll(string(d), 0o755); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	if err := writeFileAtomic(d.file(rank), rec); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	recs := make([][]byte, size)
	for {
		missing := -1
		for r := range recs {
			if recs[r] != nil {
				continue
			}
			data, err := os.ReadFile(d.file(r))
			if err != nil {
				missing = r
				continue
			}
			if !json.Valid(data) {
				return nil, fmt.Errorf("rendezvous in %s: rank %d's record %s is not JSON (a directory of another run? use a fresh one per run)",
					d, r, d.file(r))
			}
			recs[r] = data
		}
		if missing < 0 {
			return recs, nil
		}
		if err := sleep(ctx); err != nil {
			return nil, fmt.Errorf("rendezvous in %s: rank %d did not publish its address: %w", d, missing, err)
		}
	}
}

// PublishID writes the id as the file nccl-id.
func (d Dir) PublishID(_ context.Context, id []byte) error {
	if err := writeFileAtomic(d.idFile(), id); err != nil {
		return fmt.Errorf("rendezvous: %w", err)
	}
	return nil
}

// WaitID waits for the file nccl-id and returns its contents.
func (d Dir) WaitID(ctx context.Context) ([]byte, error) {
	for {
		if data, err := os.ReadFile(d.idFile()); err == nil {
			return data, nil
		}
		if err := sleep(ctx); err != nil {
			return nil, fmt.Errorf("rendezvous in %s: rank 0 did not publish the NCCL unique id: %w", d, err)
		}
	}
}

// sleep waits PollInterval, or returns ctx's error when it ends first.
func sleep(ctx context.Context) error {
	t := time.NewTimer(PollInterval)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// writeFileAtomic writes data to a temporary file in name's directory and renames it to name.
func writeFileAtomic(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

package comm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/comm"
)

// The multi-process tests re-execute the test binary as the ranks of a TCP ring. TestMain turns the
// binary into a rank when childMode is set; the other variables configure it.
const (
	childMode      = "NCCL_TEST_CHILD" // "checksum" or "loop"
	childDir       = "NCCL_TEST_DIR"   // where the ranks exchange their addresses
	childRank      = "NCCL_TEST_RANK"
	childSize      = "NCCL_TEST_SIZE"
	childOpTimeout = "NCCL_TEST_OP_TIMEOUT"

	childLifetime = 20 * time.Second // a rank left behind by a dead parent still ends
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childMode); mode != "" {
		if err := runChild(mode); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestRingProcesses runs three ranks as processes: each prints a checksum of the results of a fixed
// workload, which must equal the checksum of the same workload on an in-process group.
func TestRingProcesses(t *testing.T) {
	const n = 3
	want := localChecksum(t, n)
	ranks := startRanks(t, "checksum", n, 10*time.Second)
	for r, p := range ranks {
		select {
		case <-p.done:
		case <-time.After(childLifetime):
			t.Fatalf("rank %d still running after %v", r, childLifetime)
		}
		if p.err != nil {
			t.Fatalf("rank %d: %v\n%s", r, p.err, p.stderr.String())
		}
		var got uint64
		if _, err := fmt.Sscanf(p.stdout.String(), "checksum %x", &got); err != nil || got != want {
			t.Errorf("rank %d printed %q (%v), want checksum %x", r, p.stdout.String(), err, want)
		}
	}
}

// TestRingProcessKilled kills rank 1 of three looping on AllReduce: ranks 0 and 2 must exit within the
// op timeout with an error that names rank 1 and its address.
func TestRingProcessKilled(t *testing.T) {
	const opTimeout = 2 * time.Second
	ranks := startRanks(t, "loop", 3, opTimeout)
	for r, p := range ranks {
		select {
		case <-p.stdout.seen:
		case <-p.done:
			t.Fatalf("rank %d exited before it was ready: %v\n%s", r, p.err, p.stderr.String())
		case <-time.After(childLifetime):
			t.Fatalf("rank %d not ready after %v", r, childLifetime)
		}
	}
	if err := ranks[1].cmd.Process.Kill(); err != nil {
		t.Fatalf("kill rank 1: %v", err)
	}
	killed := time.Now()
	named := regexp.MustCompile(`(from|to) rank 1 \(127\.0\.0\.1:\d+\)`)
	for _, r := range []int{0, 2} {
		p := ranks[r]
		select {
		case <-p.done:
		case <-time.After(opTimeout + 5*time.Second):
			t.Fatalf("rank %d still running %v after rank 1 was killed", r, time.Since(killed))
		}
		took := time.Since(killed)
		stderr := p.stderr.String()
		t.Logf("rank %d exited after %v: %v: %s", r, took, p.err, stderr)
		if exit, ok := errors.AsType[*exec.ExitError](p.err); !ok || exit.ExitCode() != 1 {
			t.Errorf("rank %d: exit %v, want exit status 1", r, p.err)
		}
		if !named.MatchString(stderr) {
			t.Errorf("rank %d: error %q does not name rank 1 and its address", r, stderr)
		}
		if took > opTimeout {
			t.Errorf("rank %d exited %v after rank 1 was killed, want within the op timeout %v", r, took, opTimeout)
		}
	}
}

// rankProcess is a rank running as a child process.
type rankProcess struct {
	cmd            *exec.Cmd
	stdout, stderr *output
	done           chan struct{} // closed when the process has exited and err is set
	err            error
}

// startRanks starts n ranks in mode; t's cleanup kills those still running and waits for them.
func startRanks(t *testing.T, mode string, n int, opTimeout time.Duration) []*rankProcess {
	t.Helper()
	dir := t.TempDir()
	ranks := make([]*rankProcess, n)
	for r := range ranks {
		p := &rankProcess{
			cmd:    exec.Command(os.Args[0], "-test.run=^$"),
			stdout: newOutput("ready\n"),
			stderr: newOutput(""),
			done:   make(chan struct{}),
		}
		p.cmd.Env = append(os.Environ(),
			childMode+"="+mode,
			childDir+"="+dir,
			childRank+"="+strconv.Itoa(r),
			childSize+"="+strconv.Itoa(n),
			childOpTimeout+"="+opTimeout.String(),
		)
		p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
		if err := p.cmd.Start(); err != nil {
			t.Fatalf("start rank %d: %v", r, err)
		}
		go func() {
			p.err = p.cmd.Wait()
			close(p.done)
		}()
		t.Cleanup(func() {
			p.cmd.Process.Kill()
			<-p.done
		})
		ranks[r] = p
	}
	return ranks
}

// output collects a child's output and closes seen once it contains the line it waits for.
type output struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	seen chan struct{}
}

func newOutput(want string) *output { return &output{want: want, seen: make(chan struct{})} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	had := o.want != "" && strings.Contains(o.buf.String(), o.want)
	o.buf.Write(p)
	if o.want != "" && !had && strings.Contains(o.buf.String(), o.want) {
		close(o.seen)
	}
	return len(p), nil
}

func (o *output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// runChild is a rank's main: it joins the ring and runs mode's work.
func runChild(mode string) error {
	rank, err1 := strconv.Atoi(os.Getenv(childRank))
	size, err2 := strconv.Atoi(os.Getenv(childSize))
	opTimeout, err3 := time.ParseDuration(os.Getenv(childOpTimeout))
	if err := errors.Join(err1, err2, err3); err != nil {
		return fmt.Errorf("child config: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), childLifetime)
	defer cancel()
	c, err := joinRing(ctx, os.Getenv(childDir), rank, size, opTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	switch mode {
	case "checksum":
		sum, err := workload(ctx, c)
		if err != nil {
			return err
		}
		fmt.Printf("checksum %x\n", sum)
		return nil
	case "loop":
		buf := make(comm.HostF32, 1024)
		for i := 0; ctx.Err() == nil; i++ {
			for j := range buf {
				buf[j] = float32(rank + j + i)
			}
			// No deadline: the op timeout bounds each call.
			if err := c.AllReduce(context.Background(), buf); err != nil {
				return err
			}
			if i == 0 {
				fmt.Println("ready")
			}
		}
		return ctx.Err()
	}
	return fmt.Errorf("unknown child mode %q", mode)
}

// joinRing listens, publishes this rank's address as a file in dir, waits for the other ranks' files
// and connects.
func joinRing(ctx context.Context, dir string, rank, size int, opTimeout time.Duration) (comm.Comm, error) {
	l, err := comm.Listen("127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer l.Close()
	name := func(r int) string { return filepath.Join(dir, fmt.Sprintf("addr-%d", r)) }
	tmp := name(rank) + ".tmp"
	if err := os.WriteFile(tmp, []byte(l.Addr()), 0o600); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, name(rank)); err != nil { // readers see the whole address or nothing
		return nil, err
	}
	addrs := make([]string, size)
	for r := range addrs {
		b, err := waitForFile(ctx, name(r))
		if err != nil {
			return nil, fmt.Errorf("rank %d: address of rank %d: %w", rank, r, err)
		}
		addrs[r] = string(b)
	}
	return comm.Connect(ctx, l, comm.RingConfig{Rank: rank, Addrs: addrs, OpTimeout: opTimeout, DialTimeout: 10 * time.Second})
}

// waitForFile polls for a file until it exists or ctx ends.
func waitForFile(ctx context.Context, path string) ([]byte, error) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		b, err := os.ReadFile(path)
		if err == nil || !errors.Is(err, os.ErrNotExist) {
			return b, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

// workload runs a fixed mix of collectives and returns a hash of every result. Its values are
// multiples of 1/8 small enough that every sum is exact in float32 and in bfloat16, so the hash does
// not depend on the summation order and any Comm of the same size gives the same one.
func workload(ctx context.Context, c comm.Comm) (uint64, error) {
	h := fnv.New64a()
	put := func(v uint32) { h.Write([]byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)}) }
	r, n := c.Rank(), c.Size()
	value := func(round, i int) float32 { return float32((r+1)*(i+round)%17-8) / 8 }
	for round := range 4 {
		buf := make(comm.HostF32, 1001)
		for i := range buf {
			buf[i] = value(round, i)
		}
		if err := c.AllReduce(ctx, buf); err != nil {
			return 0, err
		}
		for _, x := range buf {
			put(math.Float32bits(x))
		}
	}
	bf := make(comm.HostBF16, 257)
	for i := range bf {
		bf[i] = uint16(math.Float32bits(value(9, i)) >> 16)
	}
	if err := c.AllReduce(ctx, bf); err != nil {
		return 0, err
	}
	for _, x := range bf {
		put(uint32(x))
	}
	send, recv := make(comm.HostF32, 5), make(comm.HostF32, 5*n)
	for i := range send {
		send[i] = value(3, i)
	}
	if err := c.AllGather(ctx, send, recv); err != nil {
		return 0, err
	}
	for _, x := range recv {
		put(math.Float32bits(x))
	}
	for root := range n {
		b := comm.HostF32{value(root, 1), value(root, 2)}
		if err := c.Broadcast(ctx, b, root); err != nil {
			return 0, err
		}
		put(math.Float32bits(b[0]))
		put(math.Float32bits(b[1]))
	}
	if err := c.Barrier(ctx); err != nil {
		return 0, err
	}
	return h.Sum64(), nil
}

// localChecksum runs workload on an in-process group of n ranks and returns the checksum they agree on.
func localChecksum(t *testing.T, n int) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	comms := comm.NewLocalGroup(n)
	sums := make([]uint64, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r, c := range comms {
		wg.Go(func() {
			defer c.Close()
			sums[r], errs[r] = workload(ctx, c)
		})
	}
	wg.Wait()
	for r := range n {
		if errs[r] != nil || sums[r] != sums[0] {
			t.Fatalf("local rank %d: workload() = %x, %v, want %x, nil", r, sums[r], errs[r], sums[0])
		}
	}
	return sums[0]
}

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is a tpfleet process started by a test (the test binary as tpfleet, see TestMain), in a process
// group of its own, so that the children it starts (launch) are killed with it when the test ends.
type proc struct {
	cmd    *exec.Cmd
	lines  chan string // stdout, line by line
	stderr *lockedBuffer
	done   chan struct{} // closed when the process was waited for
	err    error         // Wait's error, once done
}

// lockedBuffer is a bytes.Buffer safe for a process's writes and a test's reads.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startProc starts `tpfleet args...` and kills its process group when the test ends.
func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "TPFLEET_TEST_AS_MAIN=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, lines: make(chan string, 64), stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default: // nobody reads this much; drop
			}
		}
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			t.Logf("%s stderr:\n%s", name, tail(p.stderr.String(), 60))
		}
	})
	return p
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// line returns the process's next stdout line, failing the test if none comes within 30 s.
func (p *proc) line(t *testing.T) string {
	t.Helper()
	select {
	case l := <-p.lines:
		return l
	case <-p.done:
		t.Fatalf("%v exited (%v) before printing a line", p.cmd.Args[1:], p.err)
	case <-time.After(30 * time.Second):
		t.Fatalf("%v printed no line within 30s", p.cmd.Args[1:])
	}
	return ""
}

// wait waits for the process to exit within d and returns its exit code.
func (p *proc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		t.Fatalf("%v still running after %v", p.cmd.Args[1:], d)
		return -1
	}
}

// signal sends sig to the process (not its group).
func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// startEtcd runs `tpfleet etcd args...` on a free port and returns its endpoint (https:// with
// certificates in args).
func startEtcd(t *testing.T, args ...string) (*proc, string) {
	t.Helper()
	p := startProc(t, "etcd", append([]string{"etcd", "--listen", "127.0.0.1:0", "--data-dir", t.TempDir()}, args...)...)
	ep := p.line(t)
	if !strings.HasPrefix(ep, "http://127.0.0.1:") && !strings.HasPrefix(ep, "https://127.0.0.1:") {
		t.Fatalf("tpfleet etcd printed %q, want its client URL", ep)
	}
	return p, ep
}

// TestEtcdCommand: `tpfleet etcd` prints its endpoint; the cluster tools read it (nothing registered
// yet), and bad flags are usage errors.
func TestEtcdCommand(t *testing.T) {
	_, ep := startEtcd(t)
	code, stdout, stderr := tpfleet(t, "cluster", "members", "--etcd", ep, "--json")
	if code != 0 || strings.TrimSpace(stdout) != "[]" {
		t.Errorf("cluster members --json on an empty cluster = %d, %q (%s), want 0, []", code, stdout, stderr)
	}
	code, stdout, stderr = tpfleet(t, "cluster", "shards", "--etcd", ep)
	if code != 0 || !strings.Contains(stdout, "no plan under /tpfleet/default/") {
		t.Errorf("cluster shards on an empty cluster = %d, %q (%s), want 0, no plan", code, stdout, stderr)
	}
	var v struct {
		Plan *json.RawMessage `json:"plan"`
		Idle []string         `json:"idle"`
	}
	code, stdout, _ = tpfleet(t, "cluster", "shards", "--etcd", ep, "--json")
	if err := json.Unmarshal([]byte(stdout), &v); code != 0 || err != nil || v.Plan != nil || v.Idle == nil {
		t.Errorf("cluster shards --json = %d, %q, want {plan: null, idle: []}", code, stdout)
	}
	for _, args := range [][]string{
		{"cluster", "members"},
		{"cluster", "bogus", "--etcd", ep},
		{"cluster"},
		{"etcd", "extra"},
		{"coordinator", "--etcd", ep},
		{"coordinator", "--model", "m"},
	} {
		if code, _, stderr := tpfleet(t, args...); code != 2 {
			t.Errorf("tpfleet %s = exit %d (%s), want 2", strings.Join(args, " "), code, stderr)
		}
	}
}

// runInProcess runs `tpfleet args...` in this process until ctx ends, returning its stdout lines as
// they come and its exit code at the end.
func runInProcess(ctx context.Context, args ...string) (lines <-chan string, code <-chan int, stderr *lockedBuffer) {
	pr, pw := io.Pipe()
	ls, c := make(chan string, 64), make(chan int, 1)
	stderr = &lockedBuffer{}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			select {
			case ls <- sc.Text():
			default:
			}
		}
	}()
	go func() {
		c <- run(ctx, args, pw, stderr)
		pw.Close()
	}()
	return ls, c, stderr
}

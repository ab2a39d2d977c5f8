package deploy_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, COPY, ...
	args string
}

// parseDockerfile reads path's instructions, skipping comments and joining lines ending in a backslash.
func parseDockerfile(path string) ([]instruction, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []instruction
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if l, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(l + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.TrimSpace(args)})
		cur.Reset()
	}
	return out, sc.Err()
}

// shellWords splits a command line as sh would for plain words and double- or single-quoted parts (no
// expansions).
func shellWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			w.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated quote in %q", s)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// goBuild is the Dockerfile's go build: its environment assignments and go's arguments.
type goBuild struct {
	env  []string
	args []string // after "go"
	out  string   // the -o path in the image
}

var envAssign = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*=`)

// dockerfileBuild finds the build stage's `RUN [VAR=value ...] go build ...` line.
func dockerfileBuild(instrs []instruction) (goBuild, error) {
	for _, in := range instrs {
		if in.cmd != "RUN" || !strings.Contains(in.args, "go build") {
			continue
		}
		words, err := shellWords(in.args)
		if err != nil {
			return goBuild{}, err
		}
		var b goBuild
		i := 0
		for ; i < len(words) && envAssign.MatchString(words[i]); i++ {
			b.env = append(b.env, words[i])
		}
		if i+1 >= len(words) || words[i] != "go" || words[i+1] != "build" {
			return goBuild{}, fmt.Errorf("RUN %s: want [VAR=value ...] go build ...", in.args)
		}
		b.args = words[i+1:]
		for j, a := range b.args {
			if a == "-o" && j+1 < len(b.args) {
				b.out = b.args[j+1]
			}
		}
		if b.out == "" {
			return goBuild{}, fmt.Errorf("RUN %s: no -o", in.args)
		}
		return b, nil
	}
	return goBuild{}, fmt.Errorf("no RUN ... go build line")
}

// builtBinary is the tpfleet binary built once per test process by the Dockerfile's go build line, in
// the repository root (the image's /src), with -o pointed at a temporary directory.
var builtBinary = sync.OnceValues(func() (string, error) {
	instrs, err := parseDockerfile("Dockerfile")
	if err != nil {
		return "", err
	}
	b, err := dockerfileBuild(instrs)
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "tpfleet-deploy-test-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "tpfleet")
	args := make([]string, len(b.args))
	for i, a := range b.args {
		if a == b.out {
			a = bin
		}
		args[i] = a
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), b.env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("the Dockerfile's build, go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return bin, nil
})

// TestDockerfile checks the image's recipe where no docker runs: a Go build stage whose go build line
// builds the binary here (run as written, into a temporary directory), a final stage on a small non-CUDA
// base that copies that binary to the entrypoint's path and runs as a non-root user, and COPY sources
// that exist.
func TestDockerfile(t *testing.T) {
	instrs, err := parseDockerfile("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var froms []string
	var user, entrypoint string
	copies := map[string]string{} // destination: source, of COPY --from=build
	for _, in := range instrs {
		switch in.cmd {
		case "FROM":
			froms = append(froms, in.args)
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		case "COPY":
			words, _ := shellWords(in.args)
			if len(words) == 3 && words[0] == "--from=build" {
				copies[words[2]] = words[1]
			} else if len(words) >= 2 && !strings.HasPrefix(words[0], "--") {
				for _, src := range words[:len(words)-1] {
					if _, err := os.Stat(filepath.Join(repoRoot, src)); err != nil {
						t.Errorf("COPY %s: %v", in.args, err)
					}
				}
			}
		}
	}
	if len(froms) != 2 || !strings.HasPrefix(froms[0], "golang:") || !strings.HasSuffix(froms[0], " AS build") {
		t.Fatalf("FROM lines %q, want a golang:... AS build stage and a runtime stage", froms)
	}
	final := strings.ToLower(froms[1])
	if strings.Contains(final, "cuda") || strings.Contains(final, "nvidia") || strings.Contains(final, ":latest") {
		t.Errorf("runtime base %q: want a small pinned base without the CUDA toolkit", froms[1])
	}
	if uid, _, _ := strings.Cut(user, ":"); uid == "" || uid == "0" || uid == "root" {
		t.Errorf("USER %q, want a non-root user", user)
	}
	b, err := dockerfileBuild(instrs)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(entrypoint, `"/usr/local/bin/tpfleet"`) || copies["/usr/local/bin/tpfleet"] != b.out {
		t.Errorf("ENTRYPOINT %s, COPY --from=build %v: want the build's %s copied to the entrypoint", entrypoint, copies, b.out)
	}
	if src, ok := copies["/opt/tpfleet/fixtures"]; !ok || src != "/src/testdata/fixtures" {
		t.Errorf("COPY --from=build %v: want the fixtures at /opt/tpfleet/fixtures for the CPU demo", copies)
	}
	if !strings.Contains(strings.Join(b.args, " "), "./cmd/tpfleet") {
		t.Errorf("go %s does not build ./cmd/tpfleet", strings.Join(b.args, " "))
	}

	bin, err := builtBinary()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "github.com/tpfleet/tpfleet") {
		t.Errorf("the built binary's version = %v\n%s", err, out)
	}
}

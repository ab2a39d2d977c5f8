package kernels

import (
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"slices"
	"strings"
)

//go:embed prelude.cuh *.cu
var files embed.FS

// Prelude is the file every compilation unit starts with.
const Prelude = "prelude.cuh"

// Files returns the names of the kernel source files (*.cu), sorted.
func Files() []string {
	names, err := fs.Glob(files, "*.cu")
	if err != nil { // only for a malformed pattern
		panic(err)
	}
	slices.Sort(names)
	return names
}

// File returns the contents of one embedded file (a *.cu or the prelude).
func File(name string) (string, error) {
	b, err := files.ReadFile(name)
	if err != nil {
		return "", fmt.Errorf("kernels: %w", err)
	}
	return string(b), nil
}

// Source returns the single compilation unit the backend compiles: the prelude followed by every
// *.cu file in name order, each preceded by a #line directive so that compiler messages name the
// original file and line.
func Source() string { return concat(append([]string{Prelude}, Files()...)) }

// concat joins embedded files, each preceded by a #line directive.
func concat(names []string) string {
	var sb strings.Builder
	for _, name := range names {
		b, err := files.ReadFile(name)
		if err != nil { // embedded files are always readable
			panic(err)
		}
		fmt.Fprintf(&sb, "#line 1 %q\n", name)
		sb.Write(b)
		if len(b) > 0 && b[len(b)-1] != '\n' {
			sb.WriteByte('\n')
		}
	}
	return sb.String()
}

// unitsFile lists the files that must be compiled together, one group a line ("#" starts a comment).
//
//go:embed units.txt
var unitsFile string

// unitGroups parses unitsFile.
func unitGroups() [][]string {
	var groups [][]string
	for _, line := range strings.Split(unitsFile, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		if f := strings.Fields(line); len(f) > 0 {
			groups = append(groups, f)
		}
	}
	return groups
}

// Unit is one compilation unit: the prelude followed by Files, in order. Units are independent: each
// compiles alone, and every kernel is in exactly one of them.
type Unit struct {
	Name  string   // the first file's name without ".cu" ("gemv" for gemv.cu and quant.cu)
	Files []string // *.cu files
}

// Units returns the compilation units: the groups of units.txt, and every other *.cu alone, in file name
// order of their first file.
func Units() []Unit {
	grouped := map[string]bool{}
	var units []Unit
	groups := unitGroups()
	for _, g := range groups {
		for _, f := range g {
			grouped[f] = true
		}
	}
	for _, f := range Files() {
		if grouped[f] {
			for _, g := range groups {
				if g[0] == f {
					units = append(units, Unit{Name: strings.TrimSuffix(f, ".cu"), Files: g})
				}
			}
			continue
		}
		units = append(units, Unit{Name: strings.TrimSuffix(f, ".cu"), Files: []string{f}})
	}
	return units
}

// Source returns the unit's source: the prelude and its files, each preceded by a #line directive.
func (u Unit) Source() string { return concat(append([]string{Prelude}, u.Files...)) }

var entryRE = regexp.MustCompile(`extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(`)

// Entries returns the names of the extern "C" __global__ functions in src, in order of appearance.
func Entries(src string) []string {
	var names []string
	for _, m := range entryRE.FindAllStringSubmatch(src, -1) {
		names = append(names, m[1])
	}
	return names
}

// Prologue is the statement every kernel begins with (prelude.cuh): programmatic dependent launch's wait
// for the kernel before it, then its signal that the next kernel may launch. PrologueL2 is its form
// that first prefetches weights into L2 (PDL_PROLOGUE_L2(prefetch call)), which waits the same way.
const (
	Prologue   = "PDL_PROLOGUE();"
	PrologueL2 = "PDL_PROLOGUE_L2("
)

// Prologued returns the entries of src (as Entries) whose body begins with Prologue or PrologueL2: the
// kernels the backend may launch with programmatic dependent launch. A kernel without it must be launched
// without: it would not wait for the kernel before it.
func Prologued(src string) []string {
	var names []string
	for _, m := range entryRE.FindAllStringSubmatchIndex(src, -1) {
		rest := src[m[1]:]
		open := strings.IndexByte(rest, '{')
		if open < 0 {
			continue
		}
		if body := strings.TrimLeft(rest[open+1:], " \t\r\n"); strings.HasPrefix(body, Prologue) || strings.HasPrefix(body, PrologueL2) {
			names = append(names, src[m[2]:m[3]])
		}
	}
	return names
}

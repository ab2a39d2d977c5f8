package cuda

import (
	"fmt"
	"go/ast"
	"go/importer"
	"go/parser"
	"go/printer"
	"go/token"
	"go/types"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/kernels"
)

// TestLaunchArgumentsMatchKernels checks every stream.launch of the package, without a GPU, against the
// parameter lists of the kernels it may launch (kernels.Signatures): the number of arguments and the
// kind each one passes as (packArgs). The driver copies whatever a launch gives it, so a missing or extra
// argument shifts every one after it with no error: the kernel computes on garbage (an H100 run of the
// fp8 SiLU·mul epilogue gave NaN that way). launch checks the same at run time (checkArgs); this finds
// it before a device is lent.
//
// The kernel and the arguments of a launch are often built up in its function: a variable assigned one
// kernel field or another, an argument list appended to in loops and branches, a method returning one
// list or another. The test follows each function's statements along every path (unrolling loops over
// a constant, tracking if-conditions by their text so that correlated branches stay together) up to
// each launch, and checks each path's argument list against the kernels that path may launch.
func TestLaunchArgumentsMatchKernels(t *testing.T) {
	sigs := map[string][]kernels.Param{}
	for _, u := range kernels.Units() {
		s, err := kernels.Signatures(u.Source())
		if err != nil {
			t.Fatal(err)
		}
		maps.Copy(sigs, s)
	}
	// The check reads the package's source and type-checks it with its imports (the source importer runs
	// the go command). Where the test binary runs without them (the GPU machine: a copy of the test binary
	// in the repository root, no Go toolchain) launch's own check (checkArgs) does the same at run time.
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to type-check the source with (checkArgs checks every launch at run time)")
	}
	fset := token.NewFileSet()
	names, err := filepath.Glob(filepath.Join(sourceDir(t), "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	var files []*ast.File
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	sites, paths, errs := launchErrors(fset, files, sigs)
	for _, e := range errs {
		t.Error(e)
	}
	if sites < 50 {
		t.Fatalf("found %d launches: the launch pattern changed?", sites)
	}
	t.Logf("%d launches, %d paths checked against %d kernels", sites, paths, len(sigs))
}

// sourceDir is backend/cuda's directory: the working directory under go test, else found from the
// working directory or one of its parents (a test binary run from the repository root).
func sourceDir(t *testing.T) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		for _, c := range []string{d, filepath.Join(d, "backend", "cuda")} {
			if _, err := os.Stat(filepath.Join(c, "launchargs_test.go")); err == nil {
				return c
			}
		}
		if filepath.Dir(d) == d {
			t.Fatalf("no backend/cuda source at or above %s", dir)
		}
	}
}

// launchErrors type-checks files (one package, its cgo declarations faked) and follows every
// stream.launch in them (launchInterp), returning the launches and paths it checked against sigs and what
// it found wrong.
func launchErrors(fset *token.FileSet, files []*ast.File, sigs map[string][]kernels.Param) (sites, paths int, errs []string) {
	info := &types.Info{Types: map[ast.Expr]types.TypeAndValue{}}
	// FakeImportC leaves the cgo declarations untyped, so expressions of C types are errors; the
	// arguments checked here are Go values, and one left without a type fails the check.
	conf := types.Config{FakeImportC: true, Importer: importer.ForCompiler(fset, "source", nil), Error: func(error) {}}
	_, _ = conf.Check("cuda", fset, files, info)
	li := &launchInterp{fset: fset, info: info, fields: kernelFields(files), methods: map[string]*ast.FuncDecl{}, files: files}
	for _, f := range files {
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok && fd.Recv != nil && fd.Body != nil && len(fd.Recv.List) == 1 {
				li.methods[recvType(fd.Recv.List[0].Type)+"."+fd.Name.Name] = fd
			}
		}
	}
	// visit checks the launches of one function body; a function literal's are followed in its own body.
	var visit func(body *ast.BlockStmt)
	visit = func(body *ast.BlockStmt) {
		ast.Inspect(body, func(n ast.Node) bool {
			if fl, ok := n.(*ast.FuncLit); ok {
				visit(fl.Body)
				return false
			}
			call, ok := n.(*ast.CallExpr)
			if !ok || !li.isLaunch(call) {
				return true
			}
			sites++
			at := fset.Position(call.Pos())
			hits := li.follow(body, call)
			if len(hits) == 0 {
				errs = append(errs, fmt.Sprintf("%s: no path reaches this launch", at))
			}
			for _, h := range hits {
				paths++
				if err := li.check(h, sigs); err != nil {
					errs = append(errs, fmt.Sprintf("%s: %v", at, err))
				}
			}
			return true
		})
	}
	for _, f := range files {
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok && fd.Body != nil {
				li.fn = fd
				visit(fd.Body)
			}
		}
	}
	return sites, paths, errs
}

// TestLaunchInterpreter runs launchErrors on a small package with one launch of each kind it follows,
// right and wrong: a literal list, a kernel variable and a list appended to in a branch whose kernel and
// arguments come from methods that test the same condition, and a loop over a constant. Only the wrong
// ones may be reported, each at its launch.
func TestLaunchInterpreter(t *testing.T) {
	sigs, err := kernels.Signatures(`
extern "C" __global__ void ka(const float* x, int n) {}
extern "C" __global__ void kb(const float* x, int n, float* y) {}
extern "C" __global__ void kc1(const float* x, int n, float* y, int m) {}
extern "C" __global__ void kc2(const float* x, int n, float* y, int m) {}
extern "C" __global__ void kd(const float* x, float* a, float* b, float* c) {}`)
	if err != nil {
		t.Fatal(err)
	}
	const src = `package cuda

type devptr uint64
type kernel struct{}
type stream struct{}

func (s *stream) launch(k *kernel, grid, block, shmem int, args ...any) error { return nil }

type kernelSet struct {
	a, b, d *kernel
	c       [2]*kernel
}

func (k *kernelSet) table() []struct {
	name string
	dst  **kernel
} {
	return []struct {
		name string
		dst  **kernel
	}{{"ka", &k.a}, {"kb", &k.b}, {"kc1", &k.c[0]}, {"kc2", &k.c[1]}, {"kd", &k.d}}
}

type epi struct{ act *int }

func (e *epi) extra() []any {
	if e.act != nil {
		return []any{devptr(0)}
	}
	return []any{devptr(0), 1}
}

func (e *epi) pick(x, y *kernel) *kernel {
	if e.act != nil {
		return x
	}
	return y
}

func good(s *stream, k *kernelSet, e *epi, n int) error {
	args := []any{devptr(0), n}
	kern := k.a
	if e != nil {
		kern = e.pick(k.b, k.c[n&1])
		args = append(args, e.extra()...)
	}
	return s.launch(kern, 1, 1, 0, args...)
}

func goodLoop(s *stream, k *kernelSet, n int) error {
	args := []any{devptr(0)}
	for i := range 3 {
		if i >= n {
			args = append(args, devptr(0))
			continue
		}
		args = append(args, devptr(i))
	}
	return s.launch(k.d, 1, 1, 0, args...)
}

func badCount(s *stream, k *kernelSet) error { return s.launch(k.a, 1, 1, 0, devptr(0)) } // BAD

func badKind(s *stream, k *kernelSet) error { return s.launch(k.a, 1, 1, 0, devptr(0), int64(3)) } // BAD

func badBranch(s *stream, k *kernelSet, e *epi) error {
	args := []any{devptr(0), 2}
	kern := e.pick(k.b, k.a)
	if e.act != nil {
		args = append(args, devptr(0), 3)
	}
	return s.launch(kern, 1, 1, 0, args...) // BAD
}

func badLoop(s *stream, k *kernelSet) error {
	args := []any{devptr(0), 1}
	for range 2 {
		args = append(args, devptr(0))
	}
	return s.launch(k.b, 1, 1, 0, args...) // BAD
}
`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "synthetic.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	sites, _, errs := launchErrors(fset, []*ast.File{f}, sigs)
	if sites != 6 {
		t.Errorf("%d launches found, want 6", sites)
	}
	bad := map[int]bool{}
	for i, line := range strings.Split(src, "\n") {
		if strings.HasSuffix(line, "// BAD") {
			bad[i+1] = true
		}
	}
	reported := map[int]bool{}
	for _, e := range errs {
		var line int
		if _, err := fmt.Sscanf(e, "synthetic.go:%d:", &line); err != nil || !bad[line] {
			t.Errorf("reported a right launch: %s", e)
		}
		reported[line] = true
	}
	for line := range bad {
		if !reported[line] {
			t.Errorf("the wrong launch at line %d was not reported (errors: %q)", line, errs)
		}
	}
}

// TestLaunchCheckArgs is launch's run-time check (checkArgs) on a parameter list with every kind.
func TestLaunchCheckArgs(t *testing.T) {
	sigs, err := kernels.Signatures(`extern "C" __global__ void k(const float* x, int n, long long m, float s, bool b) {}`)
	if err != nil {
		t.Fatal(err)
	}
	params := sigs["k"]
	for _, c := range []struct {
		name string
		args []any
		ok   bool
	}{
		{"exact", []any{devptr(8), 3, int64(4), float32(1), true}, true},
		{"tensor and buffer for a pointer, int32 and bool for an int", []any{&tensor{}, int32(3), int64(4), float32(1), false}, true},
		{"bool for an int", []any{&buffer{}, true, int64(4), float32(1), false}, true},
		{"one missing", []any{devptr(8), 3, int64(4), float32(1)}, false},
		{"one extra", []any{devptr(8), 3, int64(4), float32(1), true, 0}, false},
		{"int for a long long", []any{devptr(8), 3, 4, float32(1), true}, false},
		{"int64 for an int", []any{devptr(8), int64(3), int64(4), float32(1), true}, false},
		{"float64 for a float", []any{devptr(8), 3, int64(4), 1.0, true}, false},
		{"int for a pointer", []any{0, 3, int64(4), float32(1), true}, false},
		{"a DType for an int", []any{devptr(8), F32, int64(4), float32(1), true}, false},
	} {
		if err := checkArgs(params, c.args); (err == nil) != c.ok {
			t.Errorf("%s: checkArgs = %v, want ok %v", c.name, err, c.ok)
		}
	}
	if err := checkArgs(nil, []any{1, 2}); err != nil {
		t.Errorf("a kernel of unknown parameters: %v", err)
	}
}

// kernelFields maps each kernel field of the kernel tables ({"name", &x.field[...]} in New and encoder)
// to the kernels it holds.
func kernelFields(files []*ast.File) map[string][]string {
	fields := map[string][]string{}
	for _, f := range files {
		ast.Inspect(f, func(n ast.Node) bool {
			cl, ok := n.(*ast.CompositeLit)
			if !ok || len(cl.Elts) != 2 {
				return true
			}
			lit, ok1 := cl.Elts[0].(*ast.BasicLit)
			addr, ok2 := cl.Elts[1].(*ast.UnaryExpr)
			if !ok1 || !ok2 || lit.Kind != token.STRING || addr.Op != token.AND {
				return true
			}
			sel, ok := unindex(addr.X).(*ast.SelectorExpr)
			if !ok {
				return true
			}
			name, err := strconv.Unquote(lit.Value)
			if err != nil {
				return true
			}
			fields[sel.Sel.Name] = append(fields[sel.Sel.Name], name)
			return true
		})
	}
	return fields
}

func unindex(e ast.Expr) ast.Expr {
	for {
		switch x := e.(type) {
		case *ast.IndexExpr:
			e = x.X
		case *ast.ParenExpr:
			e = x.X
		default:
			return e
		}
	}
}

// launchInterp follows a function's statements to its launches.
type launchInterp struct {
	fset    *token.FileSet
	info    *types.Info
	fields  map[string][]string      // kernel field → kernel names
	methods map[string]*ast.FuncDecl // the package's methods by "type.name"
	files   []*ast.File
	fn      *ast.FuncDecl // the function whose launches are followed
	depth   int           // methods being followed, nested (recursion ends at a few)
}

// isLaunch reports whether call is s.launch(kernel, grid, block, shmem, args...) on a *stream.
func (li *launchInterp) isLaunch(call *ast.CallExpr) bool {
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok || sel.Sel.Name != "launch" || len(call.Args) < 4 {
		return false
	}
	tv, ok := li.info.Types[sel.X]
	return ok && types.TypeString(tv.Type, nil) == "*cuda.stream"
}

// value is what the interpreter knows of a variable: an argument list or the kernel fields it may hold.
type value struct {
	args    []ast.Expr
	isArgs  bool
	kernels []string
}

// path is one way through a function: what its variables hold and the conditions it took.
type path struct {
	vars  map[string]value
	conds map[string]bool
	// stop: "" running; "continue", "break", "return" (with ret), "hit" (the launch reached).
	stop string
	ret  []value
	hit  *launchHit
}

func (p *path) clone() *path {
	return &path{vars: maps.Clone(p.vars), conds: maps.Clone(p.conds), stop: p.stop, ret: p.ret, hit: p.hit}
}

// forget drops what p knew of variable name: its value and the conditions that mention it.
func (p *path) forget(name string) {
	delete(p.vars, name)
	for k := range p.conds {
		if replaceIdent(k, name, "\x00") != k {
			p.conds = maps.Clone(p.conds)
			maps.DeleteFunc(p.conds, func(k string, _ bool) bool { return replaceIdent(k, name, "\x00") != k })
			return
		}
	}
}

type launchHit struct {
	args    []ast.Expr
	kernels []string
	why     string // set when the path could not be followed
}

// follow returns what every path of a function body that reaches call passes to it.
func (li *launchInterp) follow(body *ast.BlockStmt, call *ast.CallExpr) []*launchHit {
	start := &path{vars: map[string]value{}, conds: map[string]bool{}}
	var hits []*launchHit
	for _, p := range li.block(body.List, []*path{start}, call, nil) {
		if p.hit != nil {
			hits = append(hits, p.hit)
		}
	}
	return hits
}

// block runs stmts on paths. call is the launch being followed (nil inside a method called for its
// value); subst renames a method's receiver in condition keys.
func (li *launchInterp) block(stmts []ast.Stmt, paths []*path, call *ast.CallExpr, subst map[string]string) []*path {
	for _, s := range stmts {
		var next []*path
		for _, p := range paths {
			if p.stop != "" {
				next = append(next, p)
				continue
			}
			next = append(next, li.stmt(s, p, call, subst)...)
		}
		paths = next
	}
	return paths
}

func contains(n ast.Node, call *ast.CallExpr) bool {
	return call != nil && n != nil && n.Pos() <= call.Pos() && call.End() <= n.End()
}

// stmt runs one statement on p.
func (li *launchInterp) stmt(s ast.Stmt, p *path, call *ast.CallExpr, subst map[string]string) []*path {
	switch s := s.(type) {
	case *ast.BlockStmt:
		return li.block(s.List, []*path{p}, call, subst)
	case *ast.IfStmt:
		if s.Init != nil {
			if contains(s.Init, call) {
				return []*path{li.reach(p, call, subst)}
			}
			var out []*path
			for _, q := range li.stmt(s.Init, p, call, subst) {
				out = append(out, li.ifBranches(s, q, call, subst)...)
			}
			return out
		}
		return li.ifBranches(s, p, call, subst)
	case *ast.RangeStmt:
		n := -1
		if tv, ok := li.info.Types[s.X]; ok && tv.Value != nil {
			if v, err := strconv.Atoi(tv.Value.ExactString()); err == nil {
				n = v
			}
		}
		var vars []string
		for _, e := range []ast.Expr{s.Key, s.Value} {
			if id, ok := e.(*ast.Ident); ok {
				vars = append(vars, id.Name)
			}
		}
		return li.loop(s.Body, n, p, call, subst, vars...)
	case *ast.ForStmt:
		var out []*path
		if s.Init == nil {
			return li.loop(s.Body, -1, p, call, subst)
		}
		var vars []string // what the init statement declares
		if as, ok := s.Init.(*ast.AssignStmt); ok {
			for _, l := range as.Lhs {
				if id, ok := l.(*ast.Ident); ok {
					vars = append(vars, id.Name)
				}
			}
		}
		for _, q := range li.stmt(s.Init, p, call, subst) {
			out = append(out, li.loop(s.Body, -1, q, call, subst, vars...)...)
		}
		return out
	case *ast.SwitchStmt:
		if contains(s.Init, call) || contains(s.Tag, call) {
			return []*path{li.reach(p, call, subst)}
		}
		if s.Init != nil || !contains(s, call) && !steers(s.Body, call == nil) {
			break // an init statement is not followed; a switch that steers nothing passes through
		}
		// Each case is a path (their conditions are not tracked); without a default, so is none.
		var out []*path
		def := false
		for _, c := range s.Body.List {
			cc := c.(*ast.CaseClause)
			def = def || cc.List == nil
			out = append(out, li.block(cc.Body, []*path{p.clone()}, call, subst)...)
		}
		if !def {
			out = append(out, p)
		}
		for _, q := range out {
			if q.stop == "break" {
				q.stop = ""
			}
		}
		return out
	case *ast.BranchStmt:
		switch s.Tok {
		case token.CONTINUE:
			p.stop = "continue"
		case token.BREAK:
			p.stop = "break"
		}
		return []*path{p}
	case *ast.ReturnStmt:
		if contains(s, call) {
			return []*path{li.reach(p, call, subst)}
		}
		p.stop = "return"
		if call == nil && len(s.Results) == 1 {
			return li.returns(s.Results[0], p, subst)
		}
		return []*path{p}
	case *ast.AssignStmt:
		if contains(s, call) {
			return []*path{li.reach(p, call, subst)}
		}
		paths := []*path{p}
		for i, l := range s.Lhs {
			id, ok := l.(*ast.Ident)
			if !ok {
				continue
			}
			var next []*path
			for _, q := range paths {
				if len(s.Lhs) != len(s.Rhs) {
					q.forget(id.Name)
					next = append(next, q)
					continue
				}
				for _, r := range li.eval(s.Rhs[i], q, subst) {
					r.p.forget(id.Name)
					if r.known {
						r.p.vars[id.Name] = r.v
					}
					next = append(next, r.p)
				}
			}
			paths = next
		}
		return paths
	}
	if contains(s, call) {
		return []*path{li.reach(p, call, subst)}
	}
	return []*path{p}
}

// ifBranches runs an if statement's condition and branches on p (its init statement run already). An
// if that neither assigns, nor continues or breaks, nor holds the launch (an error return) does not fork.
func (li *launchInterp) ifBranches(s *ast.IfStmt, p *path, call *ast.CallExpr, subst map[string]string) []*path {
	if contains(s.Cond, call) {
		return []*path{li.reach(p, call, subst)}
	}
	if !contains(s, call) && !steers(s.Body, call == nil) && (s.Else == nil || !steers(s.Else, call == nil)) {
		return []*path{p}
	}
	var out []*path
	for _, taken := range li.branch(s.Cond, p, subst) {
		q := taken.p
		if taken.yes {
			out = append(out, li.block(s.Body.List, []*path{q}, call, subst)...)
		} else if s.Else != nil {
			out = append(out, li.stmt(s.Else, q, call, subst)...)
		} else {
			out = append(out, q)
		}
	}
	return out
}

// steers reports whether n assigns a variable or continues or breaks a loop (or returns, in a method
// followed for its value): what a path must follow.
func steers(n ast.Node, returns bool) bool {
	found := false
	ast.Inspect(n, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.AssignStmt, *ast.IncDecStmt:
			found = true
		case *ast.ReturnStmt:
			found = found || returns
		case *ast.BranchStmt:
			found = found || n.Tok == token.CONTINUE || n.Tok == token.BREAK
		case *ast.FuncLit:
			return false
		}
		return !found
	})
	return found
}

// loop runs body n times (n < 0: an unknown count, run once), ending each iteration's continue and the
// loop at a break. vars are the loop's own variables: what a path knew of them (conditions on them
// included) does not hold in the next iteration.
func (li *launchInterp) loop(body *ast.BlockStmt, n int, p *path, call *ast.CallExpr, subst map[string]string, vars ...string) []*path {
	if n < 0 {
		n = 1
	}
	paths := []*path{p}
	var done []*path
	for range n {
		for _, q := range paths {
			for _, v := range vars {
				q.forget(v)
			}
		}
		var next []*path
		for _, q := range li.block(body.List, paths, call, subst) {
			switch q.stop {
			case "continue":
				q.stop = ""
				next = append(next, q)
			case "break":
				q.stop = ""
				done = append(done, q)
			case "":
				next = append(next, q)
			default:
				done = append(done, q)
			}
		}
		paths = next
	}
	return append(done, paths...)
}

// reach is p arriving at the launch: it records the hit.
func (li *launchInterp) reach(p *path, call *ast.CallExpr, subst map[string]string) *path {
	p.stop = "hit"
	h := &launchHit{}
	p.hit = h
	ks := li.evalOne(call.Args[0], p, subst)
	if len(ks.kernels) == 0 {
		h.why = fmt.Sprintf("cannot tell which kernel %s holds", li.text(call.Args[0]))
		return p
	}
	h.kernels = ks.kernels
	h.args = call.Args[4:]
	if call.Ellipsis.IsValid() {
		v := li.evalOne(call.Args[len(call.Args)-1], p, subst)
		if !v.isArgs {
			h.why = fmt.Sprintf("cannot follow the argument list %s", li.text(call.Args[len(call.Args)-1]))
			return p
		}
		h.args = append(slices.Clone(call.Args[4:len(call.Args)-1]), v.args...)
	}
	return p
}

type evalResult struct {
	p     *path
	v     value
	known bool
}

// evalOne evaluates e where it cannot fork (a kernel reference or an argument list at a launch).
func (li *launchInterp) evalOne(e ast.Expr, p *path, subst map[string]string) value {
	rs := li.eval(e, p.clone(), subst)
	if len(rs) != 1 || !rs[0].known {
		return value{}
	}
	return rs[0].v
}

// eval evaluates e on p: an argument list ([]any{...}, append), a kernel field (x.k.field[i]), a
// variable, or a method of the package whose returns are those (followed, possibly forking p).
func (li *launchInterp) eval(e ast.Expr, p *path, subst map[string]string) []evalResult {
	unknown := []evalResult{{p: p}}
	switch x := e.(type) {
	case *ast.ParenExpr:
		return li.eval(x.X, p, subst)
	case *ast.CompositeLit:
		if at, ok := x.Type.(*ast.ArrayType); ok && at.Len == nil {
			if id, ok := at.Elt.(*ast.Ident); ok && id.Name == "any" {
				return []evalResult{{p: p, v: value{args: slices.Clone(x.Elts), isArgs: true}, known: true}}
			}
		}
		return unknown
	case *ast.Ident:
		if v, ok := p.vars[x.Name]; ok {
			return []evalResult{{p: p, v: v, known: true}}
		}
		if ks := li.kernelParam(x); len(ks) > 0 {
			return []evalResult{{p: p, v: value{kernels: ks}, known: true}}
		}
		return unknown
	case *ast.UnaryExpr:
		if x.Op == token.AND {
			return li.eval(x.X, p, subst)
		}
		return unknown
	case *ast.IndexExpr:
		base := unindex(x)
		if sel, ok := base.(*ast.SelectorExpr); ok && li.fields[sel.Sel.Name] != nil {
			return []evalResult{{p: p, v: value{kernels: []string{sel.Sel.Name}}, known: true}}
		}
		if id, ok := base.(*ast.Ident); ok {
			v, ok := p.vars[id.Name]
			return []evalResult{{p: p, v: v, known: ok && len(v.kernels) > 0}}
		}
		return li.eval(base, p, subst)
	case *ast.SelectorExpr:
		if li.fields[x.Sel.Name] != nil {
			return []evalResult{{p: p, v: value{kernels: []string{x.Sel.Name}}, known: true}}
		}
		return unknown
	case *ast.CallExpr:
		if id, ok := x.Fun.(*ast.Ident); ok && id.Name == "append" && len(x.Args) >= 1 {
			var out []evalResult
			for _, r := range li.eval(x.Args[0], p, subst) {
				if !r.known || !r.v.isArgs {
					out = append(out, evalResult{p: r.p})
					continue
				}
				more := x.Args[1:]
				if !x.Ellipsis.IsValid() {
					r.v.args = append(slices.Clone(r.v.args), more...)
					out = append(out, r)
					continue
				}
				for _, t := range li.eval(more[0], r.p, subst) {
					if !t.known || !t.v.isArgs {
						out = append(out, evalResult{p: t.p})
						continue
					}
					out = append(out, evalResult{p: t.p, v: value{args: append(slices.Clone(r.v.args), t.v.args...), isArgs: true}, known: true})
				}
			}
			return out
		}
		if sel, ok := x.Fun.(*ast.SelectorExpr); ok {
			if tv, ok := li.info.Types[sel.X]; ok {
				name := strings.TrimPrefix(types.TypeString(tv.Type, func(*types.Package) string { return "" }), "*")
				if m := li.methods[name+"."+sel.Sel.Name]; m != nil {
					return li.method(m, sel.X, x.Args, p, subst)
				}
			}
		}
		return unknown
	}
	return unknown
}

// kernelParam returns, for a *kernel parameter id of the function being followed, the kernel fields
// that the package's calls of that function pass for it.
func (li *launchInterp) kernelParam(id *ast.Ident) []string {
	fd := li.fn
	if fd == nil {
		return nil
	}
	at := -1
	i := 0
	for _, field := range fd.Type.Params.List {
		for _, name := range field.Names {
			if name.Name == id.Name && li.text(field.Type) == "*kernel" {
				at = i
			}
			i++
		}
	}
	if at < 0 {
		return nil
	}
	var ks []string
	for _, f := range li.files {
		ast.Inspect(f, func(n ast.Node) bool {
			c, ok := n.(*ast.CallExpr)
			if !ok || len(c.Args) <= at {
				return true
			}
			if sel, ok := c.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == fd.Name.Name {
				if s, ok := unindex(c.Args[at]).(*ast.SelectorExpr); ok && li.fields[s.Sel.Name] != nil && !slices.Contains(ks, s.Sel.Name) {
					ks = append(ks, s.Sel.Name)
				}
			}
			return true
		})
	}
	return ks
}

// method follows a call of the package's method m on recv with args for its return values: its
// receiver's name stands for recv in condition keys, and its parameters hold the arguments' values.
func (li *launchInterp) method(m *ast.FuncDecl, recv ast.Expr, args []ast.Expr, p *path, subst map[string]string) []evalResult {
	if li.depth >= 2 {
		return []evalResult{{p: p}}
	}
	li.depth++
	defer func() { li.depth-- }()
	inner := map[string]string{recvName(m): li.key(recv, subst)}
	q := &path{vars: map[string]value{}, conds: p.conds}
	i := 0
	for _, field := range m.Type.Params.List {
		for _, name := range field.Names {
			if i < len(args) {
				if v := li.evalOne(args[i], p, subst); v.isArgs || len(v.kernels) > 0 {
					q.vars[name.Name] = v
				}
			}
			i++
		}
	}
	var out []evalResult
	for _, r := range li.block(m.Body.List, []*path{q}, nil, inner) {
		if r.stop != "return" || len(r.ret) != 1 {
			continue
		}
		// The method's conditions on its receiver's state hold for the caller too (epi.act != nil);
		// those on its own variables do not.
		np := p.clone()
		np.conds = maps.Clone(p.conds)
		for k, v := range r.conds {
			if _, ok := p.conds[k]; !ok && strings.HasPrefix(k, inner[recvName(m)]+".") {
				np.conds[k] = v
			}
		}
		out = append(out, evalResult{p: np, v: r.ret[0], known: r.ret[0].isArgs || len(r.ret[0].kernels) > 0})
	}
	if len(out) == 0 {
		return []evalResult{{p: p}}
	}
	// Returns that leave the caller in the same state are one path.
	seen := map[string]bool{}
	uniq := out[:0]
	for _, r := range out {
		k := fmt.Sprint(r.known, li.valueKey(r.v), sortedConds(r.p.conds))
		if !seen[k] {
			seen[k] = true
			uniq = append(uniq, r)
		}
	}
	return uniq
}

func (li *launchInterp) valueKey(v value) string {
	return fmt.Sprint(v.isArgs, li.list(v.args), v.kernels)
}

func sortedConds(c map[string]bool) []string {
	var s []string
	for k, v := range c {
		s = append(s, fmt.Sprint(k, "=", v))
	}
	slices.Sort(s)
	return s
}

// recvType is a method receiver's type name, without a pointer.
func recvType(e ast.Expr) string {
	if st, ok := e.(*ast.StarExpr); ok {
		e = st.X
	}
	if id, ok := e.(*ast.Ident); ok {
		return id.Name
	}
	return ""
}

// recvName is m's receiver's name ("" when it has none).
func recvName(m *ast.FuncDecl) string {
	if len(m.Recv.List) == 1 && len(m.Recv.List[0].Names) == 1 {
		return m.Recv.List[0].Names[0].Name
	}
	return ""
}

// returns records a method's return value on p.
func (li *launchInterp) returns(e ast.Expr, p *path, subst map[string]string) []*path {
	var out []*path
	for _, r := range li.eval(e, p, subst) {
		r.p.stop = "return"
		r.p.ret = []value{r.v}
		out = append(out, r.p)
	}
	return out
}

type taken struct {
	p   *path
	yes bool
}

// branch splits p at condition c: one path where it holds and one where it does not, or only the one
// that p's earlier conditions (by key, a negation folded) allow.
func (li *launchInterp) branch(c ast.Expr, p *path, subst map[string]string) []taken {
	key, neg := li.condKey(c, subst)
	if v, ok := p.conds[key]; ok {
		return []taken{{p, v != neg}}
	}
	yes, no := p.clone(), p.clone()
	yes.conds = maps.Clone(p.conds)
	no.conds = maps.Clone(p.conds)
	yes.conds[key], no.conds[key] = !neg, neg
	return []taken{{yes, true}, {no, false}}
}

// condKey is a condition's key and whether c is its negation: !x is x negated, a == b is a != b negated.
func (li *launchInterp) condKey(c ast.Expr, subst map[string]string) (string, bool) {
	switch x := c.(type) {
	case *ast.ParenExpr:
		return li.condKey(x.X, subst)
	case *ast.UnaryExpr:
		if x.Op == token.NOT {
			k, n := li.condKey(x.X, subst)
			return k, !n
		}
	case *ast.BinaryExpr:
		if x.Op == token.EQL {
			return li.key(&ast.BinaryExpr{X: x.X, Op: token.NEQ, Y: x.Y}, subst), true
		}
	}
	return li.key(c, subst), false
}

// key prints e with the names of subst replaced (a method's receiver by its caller's expression).
func (li *launchInterp) key(e ast.Expr, subst map[string]string) string {
	s := li.text(e)
	for from, to := range subst {
		s = replaceIdent(s, from, to)
	}
	return s
}

func (li *launchInterp) text(e ast.Expr) string {
	var sb strings.Builder
	if err := printer.Fprint(&sb, li.fset, e); err != nil {
		return fmt.Sprint(e)
	}
	return sb.String()
}

// replaceIdent replaces the identifier from in s (not as part of a longer name or after a dot) by to.
func replaceIdent(s, from, to string) string {
	var sb strings.Builder
	word := func(c byte) bool {
		return c == '_' || c == '.' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
	}
	for i := 0; i < len(s); {
		if strings.HasPrefix(s[i:], from) && (i == 0 || !word(s[i-1])) && (i+len(from) == len(s) || !word(s[i+len(from)]) || s[i+len(from)] == '.') {
			sb.WriteString(to)
			i += len(from)
			continue
		}
		sb.WriteByte(s[i])
		i++
	}
	return sb.String()
}

// check compares a path's arguments with the kernels it may launch: they must fit at least one of
// them (an index chosen at run time may pick among a field's kernels, which share their parameters).
func (li *launchInterp) check(h *launchHit, sigs map[string][]kernels.Param) error {
	if h.why != "" {
		return fmt.Errorf("%s", h.why)
	}
	var tried []string
	for _, f := range h.kernels {
		for _, name := range li.fields[f] {
			params, ok := sigs[name]
			if !ok {
				return fmt.Errorf("kernel %s (field %s) is in no kernel source", name, f)
			}
			err := li.fits(h.args, params)
			if err == nil {
				return nil
			}
			tried = append(tried, fmt.Sprintf("%s: %v", name, err))
		}
	}
	return fmt.Errorf("arguments (%s) fit none of the kernels:\n\t%s", li.list(h.args), strings.Join(tried, "\n\t"))
}

func (li *launchInterp) list(args []ast.Expr) string {
	var s []string
	for _, a := range args {
		s = append(s, li.text(a))
	}
	return strings.Join(s, ", ")
}

// fits checks args' count and static kinds against params; an argument of interface type (any) is
// checked at run time only.
func (li *launchInterp) fits(args []ast.Expr, params []kernels.Param) error {
	if len(args) != len(params) {
		return fmt.Errorf("%d arguments for %d parameters", len(args), len(params))
	}
	for i, a := range args {
		tv, ok := li.info.Types[a]
		if !ok {
			return fmt.Errorf("argument %d (%s): no type", i, li.text(a))
		}
		k, dynamic := staticKind(tv.Type)
		if dynamic {
			continue
		}
		if !argFits(k, params[i].Kind) {
			return fmt.Errorf("argument %d %s (%s) passes as %s for %s", i, li.text(a), tv.Type, k, params[i])
		}
	}
	return nil
}

// staticKind is argKind for a static type; dynamic for an interface (its value decides).
func staticKind(t types.Type) (k kernels.Kind, dynamic bool) {
	if _, ok := t.Underlying().(*types.Interface); ok {
		return kernels.KindOther, true
	}
	switch types.TypeString(t, func(p *types.Package) string { return p.Name() }) {
	case "cuda.devptr", "*cuda.tensor", "*cuda.buffer":
		return kernels.KindPointer, false
	case "int", "int32", "untyped int":
		return kernels.KindInt32, false
	case "int64":
		return kernels.KindInt64, false
	case "float32":
		return kernels.KindFloat32, false
	case "bool", "untyped bool":
		return kernels.KindBool, false
	}
	return kernels.KindOther, false
}

// nvrtc_check.c: compiles one CUDA source file to a cubin with a host libnvrtc (no GPU needed), with the
// backend's options (backend/cuda/nvrtc.go's compileOptions), so that inline PTX goes through ptxas
// here. Usage: nvrtc_check FILE ARCH [LIBNVRTC] [EXTRA-OPTION]; prints ptxas' log with -Xptxas=-v as the
// extra option. Built and run by scripts/gpu/nvrtc-check.sh.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int (*create_t)(void**, const char*, const char*, int, const char* const*, const char* const*);
typedef int (*compile_t)(void*, int, const char* const*);
typedef int (*size_t_t)(void*, size_t*);
typedef int (*log_t)(void*, char*);

int main(int argc, char** argv) {
	if (argc < 3) {
		fprintf(stderr, "usage: %s FILE ARCH [LIBNVRTC] [EXTRA-OPTION]\n", argv[0]);
		return 2;
	}
	const char* lib = argc > 3 ? argv[3] : "libnvrtc.so";
	void* h = dlopen(lib, RTLD_NOW);
	if (!h) {
		fprintf(stderr, "nvrtc_check: dlopen %s: %s\n", lib, dlerror());
		return 2;
	}
	create_t create = (create_t)dlsym(h, "nvrtcCreateProgram");
	compile_t compile = (compile_t)dlsym(h, "nvrtcCompileProgram");
	size_t_t logSize = (size_t_t)dlsym(h, "nvrtcGetProgramLogSize");
	log_t getLog = (log_t)dlsym(h, "nvrtcGetProgramLog");
	size_t_t cubinSize = (size_t_t)dlsym(h, "nvrtcGetCUBINSize");
	if (!create || !compile || !logSize || !getLog || !cubinSize) {
		fprintf(stderr, "nvrtc_check: %s lacks an NVRTC symbol (nvrtcGetCUBINSize needs CUDA 11.1+)\n", lib);
		return 2;
	}
	FILE* f = fopen(argv[1], "rb");
	if (!f) {
		perror(argv[1]);
		return 2;
	}
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char* src = malloc(n + 1);
	if (fread(src, 1, n, f) != (size_t)n) {
		perror(argv[1]);
		return 2;
	}
	src[n] = 0;
	fclose(f);
	void* prog;
	if (create(&prog, src, argv[1], 0, NULL, NULL) != 0) {
		fprintf(stderr, "nvrtc_check: nvrtcCreateProgram failed\n");
		return 1;
	}
	char arch[64];
	snprintf(arch, sizeof arch, "--gpu-architecture=%s", argv[2]);
	const char* opts[] = {arch, "-std=c++17", "--fmad=true", argc > 4 ? argv[4] : NULL};
	int st = compile(prog, argc > 4 ? 4 : 3, opts);
	size_t ls = 0;
	logSize(prog, &ls);
	char* lg = malloc(ls + 1);
	getLog(prog, lg);
	lg[ls] = 0;
	if (ls > 1) fprintf(stderr, "%s\n", lg);
	if (st != 0) {
		fprintf(stderr, "nvrtc_check: %s: compile failed (%d)\n", argv[1], st);
		return 1;
	}
	size_t cs = 0;
	cubinSize(prog, &cs);
	printf("%s: %s cubin, %zu bytes\n", argv[1], argv[2], cs);
	return 0;
}

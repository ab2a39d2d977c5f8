# scripts/gpu/libdirs.sh — sourced by the GPU scripts: exports TPFLEET_LIB_DIRS, the pip wheels' NVIDIA
# library folders (NCCL, cuBLAS) for when they are not in a system directory, unless it is set already.
if [ -z "${TPFLEET_LIB_DIRS:-}" ]; then
	TPFLEET_LIB_DIRS=$(python3 -c 'import glob, site; print(":".join(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")))' 2>/dev/null || true)
	export TPFLEET_LIB_DIRS
fi

# scripts/gpu/units.sh — sourced by the kernel checks (cucheck.sh, nvrtc-check.sh): kernel_units fills the
# array units with the compilation units of kernels/ as kernels.Units makes them, from the repository root:
# each line of kernels/units.txt (files compiled together), then every other *.cu file by itself.
kernel_units() {
	local grouped line f
	grouped=$(sed -e 's/#.*//' kernels/units.txt | tr -s ' \t' '\n\n' | grep -v '^$' || true)
	units=()
	while read -r line; do
		line=${line%%#*}
		[ -n "${line// /}" ] && units+=("$line")
	done <kernels/units.txt
	for f in $(cd kernels && ls *.cu | sort); do
		grep -qx "$f" <<<"$grouped" || units+=("$f")
	done
}

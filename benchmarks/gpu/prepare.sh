#!/usr/bin/env bash
# Prepare the GPU session: the Python packages the GPU machine lacks, and a subset of the sample
# JPEGs, packed into parts that each fit one device call (64 MiB with the working tree).
#
#   . .venv/bin/activate && bash benchmarks/gpu/prepare.sh
#
# Needs PyPI (pip download) and ../shared/data/imagenet-sample; runs here, never on the device.
# Writes .gpuwheels/ (git-ignored):
#   wheels/      the py3.12 manylinux x86_64 wheels of benchmarks/gpu/wheels.txt (+ deepspeed, built)
#   stage/       each stage installed with pip --target for CPython 3.12 (what /tmp/fatscale/site
#                becomes on the device), pruned of files only other Pythons load
#   payload/     early.tar.xz, late.tar.xz (the stages), images.tar (the JPEG subset)
#   p01/ p02/ .. the parts: part.bin + manifest.json; each device call carries one (run.sh)
# Environment: PYTHON (default python3: needs pip, packaging and, to build deepspeed, torch),
# IMAGES (the JPEG folder), NUM_IMAGES (default: as many as fill the last required part, at
# least MIN_IMAGES=64),
# MARGIN_MIB (room left in each call for the working tree to grow, default 4), XZ_LEVEL (6).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/benchmarks/gpu
DIR=${GPUWHEELS:-$REPO/.gpuwheels}
PYTHON=${PYTHON:-python3}
IMAGES=${IMAGES:-$REPO/../shared/data/imagenet-sample}
MARGIN_MIB=${MARGIN_MIB:-4}
XZ_LEVEL=${XZ_LEVEL:-6}
CALL_MIB=64                      # the device tool's limit on what one call carries
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --only-binary=:all:)

say() { printf 'prepare: %s\n' "$*"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

for tool in tar xz split sha256sum git; do
    command -v "$tool" >/dev/null || { echo "prepare: needs $tool" >&2; exit 1; }
done
"$PYTHON" -c 'import pip, packaging' || { echo "prepare: $PYTHON needs pip and packaging" >&2; exit 1; }
[ -d "$IMAGES" ] || { echo "prepare: no image folder $IMAGES (set IMAGES=...)" >&2; exit 1; }
mkdir -p "$DIR/wheels" "$DIR/payload"

# ---- 1. wheels (pip download skips files already there)
mapfile -t EARLY < <(awk '$1 == "early" { print $2 }' "$HERE/wheels.txt")
mapfile -t LATE < <(awk '$1 == "late" { print $2 }' "$HERE/wheels.txt")
mapfile -t EXTRA < <(awk '$1 == "extra" { print $2 }' "$HERE/wheels.txt")
BINARY=()
for spec in "${EARLY[@]}" "${LATE[@]}" "${EXTRA[@]}"; do [ "${spec%%==*}" = deepspeed ] || BINARY+=("$spec"); done
say "downloading ${#BINARY[@]} wheels"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORM[@]}" -d "$DIR/wheels" "${BINARY[@]}"

# deepspeed publishes only an sdist: build its wheel here. Its setup.py imports torch, so the
# build runs in this environment (--no-build-isolation); no op is prebuilt (DS_BUILD_OPS=0), so
# the wheel is pure Python and its ops compile just in time where they are used.
DS_SPEC=$(printf '%s\n' "${EARLY[@]}" | grep '^deepspeed==')
DS_WHEEL=$(ls "$DIR/wheels"/deepspeed-"${DS_SPEC#deepspeed==}"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$DS_WHEEL" ]; then
    say "building the $DS_SPEC wheel"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$DIR/wheels" "$DS_SPEC"
    DS_WHEEL=$(ls "$DIR/wheels"/deepspeed-"${DS_SPEC#deepspeed==}"-*.whl | head -1)
fi
case "$(basename "$DS_WHEEL")" in
    *-py3-none-any.whl) ;;
    *) echo "prepare: $DS_WHEEL is not a py3-none-any wheel (compiled ops?)" >&2; exit 1 ;;
esac

wheel_file() {  # NAME==VERSION -> its file in wheels/
    local name=${1%%==*} version=${1#*==}
    name=$(printf '%s' "$name" | tr 'A-Z.-' 'a-z__')
    ls "$DIR/wheels"/* | awk -v n="$name" -v v="$version" '{
        f = $0; sub(".*/", "", f); split(f, p, "-"); k = tolower(p[1]); gsub(/[.-]/, "_", k)
        if (k == n && p[2] == v) print $0 }' | head -1
}
wheels_of() {  # NAME==VERSION... -> their files, one a line
    local spec f
    for spec in "$@"; do
        f=$(wheel_file "$spec")
        [ -n "$f" ] || { echo "prepare: no wheel for $spec" >&2; return 1; }
        printf '%s\n' "$f"
    done
}
mapfile -t EARLY_WHEELS < <(wheels_of "${EARLY[@]}")
mapfile -t LATE_WHEELS < <(wheels_of "${LATE[@]}")
mapfile -t EXTRA_WHEELS < <(wheels_of "${EXTRA[@]}")
[ "${#EARLY_WHEELS[@]}" = "${#EARLY[@]}" ] && [ "${#LATE_WHEELS[@]}" = "${#LATE[@]}" ] \
    && [ "${#EXTRA_WHEELS[@]}" = "${#EXTRA[@]}" ] || exit 1

# ---- 2. every requirement is carried or on the device (or skipped with a reason)
"$PYTHON" "$HERE/packing.py" closure --device "$HERE/device_packages.txt" --skip "$HERE/wheels.txt" \
    "${EARLY_WHEELS[@]}" "${LATE_WHEELS[@]}" "${EXTRA_WHEELS[@]}"

# ---- 3. stages: installed for CPython 3.12 (pip allows --target with a foreign platform when
# only wheels are used), pruned, packed with xz: the wheels' deflate leaves ~28% on the table.
pack_stage() {  # NAME WHEEL...
    local name=$1; shift
    local payload=$DIR/payload/$name.tar.xz
    local stamp
    stamp=$(for w in "$@"; do basename "$w"; done | sort | sha256sum | cut -c1-16)
    if [ -f "$payload" ] && [ "$(cat "$payload.stamp" 2>/dev/null)" = "$stamp" ]; then
        say "$name: $(mib "$(stat -c %s "$payload")") MiB (up to date)"; return
    fi
    rm -rf "$DIR/stage/$name"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-compile --no-index \
        "${PLATFORM[@]}" --target "$DIR/stage/$name" "$@"
    "$PYTHON" "$HERE/packing.py" prune "$DIR/stage/$name"
    say "$name: $(du -sb "$DIR/stage/$name" | cut -f1 | xargs -I{} awk 'BEGIN { printf "%.1f", {} / 1048576 }') MiB installed, compressing (xz -$XZ_LEVEL)"
    tar -C "$DIR/stage/$name" --sort=name --owner=0 --group=0 --numeric-owner -cf - . \
        | xz -"$XZ_LEVEL" -T0 -c > "$payload.tmp"
    mv "$payload.tmp" "$payload"
    echo "$stamp" > "$payload.stamp"
    say "$name: $(mib "$(stat -c %s "$payload")") MiB"
}
pack_stage early "${EARLY_WHEELS[@]}"
pack_stage late "${LATE_WHEELS[@]}"
pack_stage extra "${EXTRA_WHEELS[@]}"

# ---- 4. part size and image subset: the parts the required payloads (early, late, images) need,
# the JPEGs filling the room left in the last of them; the optional payload (extra) after them.
TREE=$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
PART=$(( (CALL_MIB - MARGIN_MIB) * 1048576 - TREE - 65536 ))   # 64 KiB for the manifest and folders
EARLY_B=$(stat -c %s "$DIR/payload/early.tar.xz")
LATE_B=$(stat -c %s "$DIR/payload/late.tar.xz")
[ "$EARLY_B" -lt "$PART" ] || { echo "prepare: the early payload does not fit in one part" >&2; exit 1; }
mapfile -t ALL_JPEGS < <(cd "$IMAGES" && ls | grep -iE '\.jpe?g$' | sort)
jpeg_sizes() { (cd "$IMAGES" && printf '%s\0' "${ALL_JPEGS[@]}" | xargs -0 stat -c %s); }
MIN_IMAGES=${MIN_IMAGES:-64}
# bytes a tar of the first n JPEGs takes: 512-byte header + contents rounded up to 512 each
min_bytes=$(jpeg_sizes | awk -v n="$MIN_IMAGES" 'NR <= n { s += 512 + int(($1 + 511) / 512) * 512 } END { print s + 20480 }')
COUNT=$(( (EARLY_B + LATE_B + min_bytes + PART - 1) / PART ))
ROOM=$(( COUNT * PART - EARLY_B - LATE_B - 20480 - 1024 ))
if [ -n "${NUM_IMAGES:-}" ]; then
    N=$NUM_IMAGES
else  # as many JPEGs (in name order: one per class) as fit in ROOM
    N=$(jpeg_sizes | awk -v room="$ROOM" '{ s += 512 + int(($1 + 511) / 512) * 512; if (s <= room) n++ } END { print n + 0 }')
fi
[ "$N" -gt "${#ALL_JPEGS[@]}" ] && N=${#ALL_JPEGS[@]}
rm -rf "$DIR/images" && mkdir -p "$DIR/images"
(cd "$IMAGES" && cp -- "${ALL_JPEGS[@]:0:$N}" "$DIR/images/")
tar -C "$DIR" --sort=name --owner=0 --group=0 --numeric-owner --format=ustar -cf "$DIR/payload/images.tar" images
IMAGES_B=$(stat -c %s "$DIR/payload/images.tar")
REQUIRED=$(( EARLY_B + LATE_B + IMAGES_B ))
say "working tree $(mib "$TREE") MiB, so parts of $(mib "$PART") MiB; $N JPEGs ($(mib "$IMAGES_B") MiB)"

# ---- 5. parts
"$PYTHON" "$HERE/packing.py" pack --part-bytes "$PART" --out "$DIR" \
    "early=$DIR/payload/early.tar.xz:site" "late=$DIR/payload/late.tar.xz:site" \
    "images=$DIR/payload/images.tar:data" "extra=$DIR/payload/extra.tar.xz:site:optional"
say "wheels: $(mib "$(cat "${EARLY_WHEELS[@]}" "${LATE_WHEELS[@]}" "${EXTRA_WHEELS[@]}" | wc -c)") MiB as downloaded; required payloads $(mib "$REQUIRED") MiB"
REQUIRED_PARTS=$("$PYTHON" -c '
import json, sys
m = json.load(open(sys.argv[1]))
print(" ".join(p["name"] for p in m["parts"] if p["required"]))' "$DIR/p01/manifest.json")
say "device calls, back to back (benchmarks/gpu/README.md):"
for p in $REQUIRED_PARTS; do say "  run: bash benchmarks/gpu/run.sh $p   carry: [\".gpuwheels/$p\"]"; done

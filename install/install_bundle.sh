#!/usr/bin/env bash
# Install an offline bundle (install/offline_bundle.py) on a node without internet access.
#
#   bash install/install_bundle.sh BUNDLE_DIR [--target DIR] [--python PYTHON]
#
# BUNDLE_DIR holds MANIFEST and the parts it lists. Each part is checked (size, sha256) before
# anything is installed; then, with no network:
#   a wheels bundle: pip install --no-index --no-deps of its wheels, into the Python's environment,
#                    or into --target DIR
#   a tree bundle:   the folder unpacked into --target DIR (default BUNDLE_DIR/site), for PYTHONPATH
# and at last every requirement of the installed packages and of fatscale (the pyproject.toml of
# this checkout) must be met by what that Python then sees (install/verify_requirements.py), but
# for the packages the bundle omitted on purpose.
# PYTHON: the node's interpreter (default python3); it must be the bundle's version.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { printf 'install_bundle: %s\n' "$*"; }
fail() { printf 'install_bundle: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '4,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

BUNDLE= TARGET= PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage ;;
        --target) [ $# -ge 2 ] || fail "--target needs a folder"; TARGET=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; PY=$2; shift 2 ;;
        -*) fail "unknown option $1 (see --help)" ;;
        *) [ -z "$BUNDLE" ] || fail "one bundle folder, got $BUNDLE and $1"; BUNDLE=$1; shift ;;
    esac
done
[ -n "$BUNDLE" ] || usage
MANIFEST=$BUNDLE/MANIFEST
[ -f "$MANIFEST" ] || fail "$MANIFEST: no such file (is $BUNDLE an offline bundle?)"
for tool in sha256sum tar; do command -v "$tool" >/dev/null || fail "needs $tool"; done
command -v "$PY" >/dev/null || fail "no Python $PY (set --python)"

FORMAT= PYVER= PARTS=() DISTS=() OMITTED=()
while read -r kind a b c; do
    case $kind in
        format) FORMAT=$a ;;
        python) PYVER=$a ;;
        part) PARTS+=("$a $b $c") ;;
        dist) DISTS+=("$a") ;;
        omitted) OMITTED+=("$a") ;;
    esac
done < "$MANIFEST"
[[ $FORMAT == wheels || $FORMAT == tree ]] || fail "$MANIFEST: unknown format '$FORMAT'"
[ ${#PARTS[@]} -gt 0 ] || fail "$MANIFEST: lists no part"
HAVE=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$HAVE" = "$PYVER" ] || fail "the bundle is for Python $PYVER, $PY is $HAVE (set --python)"
[ "$FORMAT" = tree ] && [ -z "$TARGET" ] && TARGET=$BUNDLE/site

# Every part, before anything is written: present, of its size, of its sha256.
FILES=()
for entry in "${PARTS[@]}"; do
    read -r name bytes digest <<< "$entry"
    file=$BUNDLE/$name
    [ -f "$file" ] || fail "$file is missing (part $name of ${#PARTS[@]})"
    [ "$(stat -c %s "$file")" = "$bytes" ] || fail "$file is damaged: $(stat -c %s "$file") bytes, MANIFEST says $bytes"
    [ "$(sha256sum < "$file" | cut -d' ' -f1)" = "$digest" ] || fail "$file is damaged: its sha256 differs from MANIFEST's"
    FILES+=("$file")
done
say "${#FILES[@]} part(s) checked"

if [ "$FORMAT" = tree ]; then
    [ ! -e "$TARGET" ] || fail "$TARGET exists: remove it, or name another with --target"
    rm -rf "$TARGET.partial" && mkdir -p "$TARGET.partial"
    if command -v xz >/dev/null; then
        cat "${FILES[@]}" | xz -dc | tar -x -C "$TARGET.partial"
    else  # Python's own lzma: slower, always there
        cat "${FILES[@]}" | "$PY" -c 'import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as t:
    t.extractall(sys.argv[1], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' "$TARGET.partial"
    fi
    # nvidia/ holds DALI's libraries here and torch's CUDA libraries in the node's site-packages: the
    # one found first must span both, or it hides the other.
    if [ -d "$TARGET.partial/nvidia" ]; then
        printf '%s\n' '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' > "$TARGET.partial/nvidia/__init__.py"
    fi
    mv "$TARGET.partial" "$TARGET"
    export PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH}
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    cat "${FILES[@]}" | tar -x -C "$WORK"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps ${TARGET:+--target "$TARGET"} "$WORK"/*.whl
    [ -n "$TARGET" ] && export PYTHONPATH=$TARGET${PYTHONPATH:+:$PYTHONPATH}
fi
say "${#DISTS[@]} packages installed${TARGET:+ into $TARGET}"

CHECK=(--dists "${DISTS[@]}" --ignore "${OMITTED[@]}")
PROJECT=$(dirname "$HERE")/pyproject.toml
[ -f "$PROJECT" ] && CHECK+=(--project "$PROJECT")
"$PY" "$HERE/verify_requirements.py" "${CHECK[@]}" \
    || fail "some requirements are not met (above): install those packages, or rebuild the bundle without --without/--against for them"
[ -z "$TARGET" ] || say "use it with: export PYTHONPATH=$(cd "$TARGET" && pwd)\${PYTHONPATH:+:\$PYTHONPATH}"

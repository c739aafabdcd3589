#!/usr/bin/env bash
# Builds the controller and agent images from images/Dockerfile with docker, podman or buildah
# (whichever is found first; $BUILDER overrides), tagged $REGISTRY/mesh-{controller,agent}:$TAG.
#
#   images/build.sh                      # ghcr.io/harness-mesh/mesh-*:<workspace version>
#   REGISTRY=localhost TAG=dev images/build.sh
#
# Prints the two image references, one per line, on stdout. The build pulls its bases (rust,
# alpine) from Docker Hub.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
registry="${REGISTRY:-ghcr.io/harness-mesh}"
tag="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)}"
[ -n "$tag" ] || { echo "images/build.sh: no TAG and no version in Cargo.toml" >&2; exit 2; }

builder="${BUILDER:-}"
if [ -z "$builder" ]; then
  for candidate in docker podman buildah; do
    if command -v "$candidate" >/dev/null 2>&1; then builder="$candidate"; break; fi
  done
fi
[ -n "$builder" ] || { echo "images/build.sh: install docker, podman or buildah (or set BUILDER)" >&2; exit 2; }

for component in controller agent; do
  image="$registry/mesh-$component:$tag"
  echo "[images] building $image with $builder" >&2
  case "$builder" in
    docker) docker build -f "$repo/images/Dockerfile" --target "$component" -t "$image" "$repo" >&2 ;;
    podman | buildah)
      "$builder" build --ignorefile "$repo/images/Dockerfile.dockerignore" \
        -f "$repo/images/Dockerfile" --target "$component" -t "$image" "$repo" >&2 ;;
    *) echo "images/build.sh: unknown BUILDER '$builder' (docker, podman or buildah)" >&2; exit 2 ;;
  esac
  echo "$image"
done

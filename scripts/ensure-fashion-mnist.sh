#!/usr/bin/env bash
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files in /usr/share/datasets/fashion-mnist).
set -u
dir="${TLR_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; tests that need it will be skipped"
else
  echo "Fashion-MNIST is missing. Install it with:"
  echo "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
  echo "(tests that need it will be skipped)"
fi
exit 0

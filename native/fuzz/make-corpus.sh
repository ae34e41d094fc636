#!/bin/bash
# make-corpus.sh OUTDIR - seed corpus for the libvdsk fuzz targets, made
# with qemu-img/qemu-io (nothing is committed): OUTDIR/{qcow2,vmdk,vdi,vpc,
# probe}/ with small images (tiny virtual sizes and clusters) covering the
# features the readers handle: qcow2 v2/v3, cluster sizes, refcount
# widths, zero/discarded/compressed (zlib, zstd) clusters, extended L2,
# a backing file, internal snapshots, lazy refcounts; vmdk
# monolithicSparse, streamOptimized and a monolithicFlat descriptor;
# vdi dynamic/static; vpc dynamic/fixed.  probe/ gets all of them plus
# raw bytes.  Backing and extent names are "base.raw", the raw image the
# harness keeps beside each input.
set -euo pipefail
out=${1:?usage: make-corpus.sh OUTDIR}
command -v qemu-img >/dev/null || { echo "make-corpus: needs qemu-img" >&2; exit 2; }
mkdir -p "$out"/{qcow2,vmdk,vdi,vpc,probe}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

q() { qemu-img "$@" >/dev/null; }
io() { qemu-io "$@" >/dev/null; }     # io -f FMT IMG -c CMD ...

# raw source data: a pattern, a hole, more pattern (compressible)
q create -f raw src.raw 128K
io -f raw -c 'write -P 0x11 0 20k' -c 'write -P 0x5a 40k 12k' \
    -c 'write -P 0xc3 100k 5k' src.raw
q create -f raw base.raw 192K
io -f raw -c 'write -P 0x77 0 192k' base.raw

# qcow2: writes, a zero range and a discard in one image
qcow2_data() {
    io -f qcow2 -c 'write -P 0xab 0 3k' -c 'write -P 0xcd 33k 1k' \
        -c 'write -z 8k 4k' -c 'write -P 0xee 60k 2k' \
        -c 'discard 60k 2k' "$1"
}
n=0
for opts in compat=1.1,cluster_size=512 compat=0.10,cluster_size=512 \
    compat=1.1,cluster_size=4096,refcount_bits=1 \
    compat=1.1,cluster_size=4096,refcount_bits=64 \
    compat=1.1,cluster_size=4096,lazy_refcounts=on \
    compat=1.1,cluster_size=16384,extended_l2=on \
    compat=0.10,cluster_size=65536; do
    n=$((n + 1))
    q create -f qcow2 -o "$opts" "q$n.qcow2" 64K
    cp "q$n.qcow2" "$out/qcow2/empty-$n"
    qcow2_data "q$n.qcow2"
    cp "q$n.qcow2" "$out/qcow2/data-$n"
done
q convert -c -O qcow2 -o cluster_size=4096 src.raw "$out/qcow2/zlib"
q convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd src.raw \
    "$out/qcow2/zstd"
q convert -c -O qcow2 -o compat=0.10,cluster_size=512 src.raw \
    "$out/qcow2/zlib-v2"
q create -f qcow2 -o cluster_size=4096 -b base.raw -F raw back.qcow2 192K
io -f qcow2 -c 'write -P 0x99 4k 6k' back.qcow2
cp back.qcow2 "$out/qcow2/backing"
q create -f qcow2 -o cluster_size=4096 snap.qcow2 64K
qcow2_data snap.qcow2
q snapshot -c s1 snap.qcow2
io -f qcow2 -c 'write -P 0x42 0 10k' snap.qcow2
cp snap.qcow2 "$out/qcow2/snapshot-1"
q snapshot -c second-snapshot snap.qcow2
io -f qcow2 -c 'write -z 0 4k' snap.qcow2
cp snap.qcow2 "$out/qcow2/snapshot-2"

# vmdk
q create -f vmdk sparse.vmdk 1M
cp sparse.vmdk "$out/vmdk/sparse-empty"
io -f vmdk -c 'write -P 0xab 0 3k' -c 'write -P 0xcd 70k 1k' sparse.vmdk
cp sparse.vmdk "$out/vmdk/sparse-data"
q convert -O vmdk -o subformat=streamOptimized src.raw "$out/vmdk/stream"
q create -f vmdk -o subformat=monolithicFlat flat.vmdk 192K
sed 's/"flat-flat.vmdk"/"base.raw"/' flat.vmdk > "$out/vmdk/flat-descriptor"

# vdi (1 MiB blocks: a small disk keeps the allocated one small)
q create -f vdi dyn.vdi 1M
cp dyn.vdi "$out/vdi/dynamic-empty"
io -f vdi -c 'write -P 0xab 512 3k' dyn.vdi
cp dyn.vdi "$out/vdi/dynamic-data"
q create -f vdi -o static=on "$out/vdi/static" 64K

# vpc
q create -f vpc dyn.vhd 1M
cp dyn.vhd "$out/vpc/dynamic-empty"
q create -f vpc dyn2.vhd 64K
io -f vpc -c 'write -P 0xab 512 3k' dyn2.vhd
cp dyn2.vhd "$out/vpc/dynamic-data"
q create -f vpc -o subformat=fixed "$out/vpc/fixed" 64K

for f in qcow2 vmdk vdi vpc; do
    for s in "$out/$f"/*; do
        cp "$s" "$out/probe/$f-$(basename "$s")"
    done
done
head -c 4096 src.raw > "$out/probe/raw"
printf 'QFI\373\0\0\0\1' > "$out/probe/qcow1-magic"

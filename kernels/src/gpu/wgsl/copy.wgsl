// Strided copy of 32-bit words, whatever the dtype: permute, broadcast_to, slice, concat and pad
// are all this kernel with different strides.
//
// prm: [0] n, [1] threads per grid row, [2] rank, [3] src base, [4] dst base,
//      [5 .. 5+r] view shape, [5+r .. 5+2r] src strides, [5+2r .. 5+3r] dst strides.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * prm[1];
    if (i >= prm[0]) {
        return;
    }
    let rank = prm[2];
    var rem = i;
    var s = prm[3];
    var d = prm[4];
    for (var k = i32(rank) - 1; k >= 0; k = k - 1) {
        let size = prm[5u + u32(k)];
        let c = rem % size;
        rem = rem / size;
        s = s + c * prm[5u + rank + u32(k)];
        d = d + c * prm[5u + 2u * rank + u32(k)];
    }
    out[d] = src[s];
}

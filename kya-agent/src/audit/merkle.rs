//! RFC 6962 (Certificate Transparency) Merkle tree hashing, as also used by
//! C2SP tlog-checkpoint: every audit record line is one leaf.
//!
//! * leaf hash  = SHA-256(0x00 || leaf bytes)
//! * node hash  = SHA-256(0x01 || left || right)
//! * empty tree = SHA-256("")
//!
//! The domain-separation prefixes make a leaf impossible to pass off as an
//! interior node (second-preimage defence). The split rule (the left subtree
//! holds the largest power of two strictly below `n`) is RFC 6962 §2.1; a
//! midpoint split would give a tree nobody else can verify.
//!
//! [`Frontier`] is what the writer keeps in memory: one subtree root per set bit
//! of the tree size, O(log n) hashes, enough to append and to compute the root.
//! The proof functions take the full list of leaf hashes; they exist for
//! verifiers and tests, not for the hot path.

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Errors from proof generation with impossible parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("cannot prove consistency from size {first} to size {second}")]
    BadSizes { first: u64, second: u64 },
}

/// SHA-256 of the empty string: the root of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The RFC 6962 leaf hash of `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// The RFC 6962 interior node hash.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The Merkle tree hash (MTH) of a list of leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof (audit path, RFC 6962 §2.1.1) of leaf `index` in the tree of `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, MerkleError> {
    let size = leaves.len() as u64;
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let mut out = Vec::new();
    path(index as usize, leaves, &mut out);
    Ok(out)
}

fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(root(&leaves[..k]));
    }
}

/// The consistency proof (RFC 6962 §2.1.2) between the first `first` leaves and all of `leaves`.
pub fn consistency_proof(leaves: &[Hash], first: u64) -> Result<Vec<Hash>, MerkleError> {
    let second = leaves.len() as u64;
    if first > second {
        return Err(MerkleError::BadSizes { first, second });
    }
    let mut out = Vec::new();
    if first > 0 && first < second {
        subproof(first as usize, leaves, true, &mut out);
    }
    Ok(out)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            out.push(root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], complete, out);
        out.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root(&leaves[..k]));
    }
}

/// Verify an inclusion proof (RFC 9162 §2.1.3.2). Never panics on hostile input.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Verify a consistency proof between a tree of `first` leaves with root `first_root`
/// and one of `second` leaves with root `second_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        // Every tree extends the empty tree; there is nothing to prove.
        return proof.is_empty() && *first_root == empty_root();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let mut fr = path[0];
    let mut sr = path[0];
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *first_root && sr == *second_root
}

/// The right edge of an append-only tree: the roots of its perfect subtrees,
/// largest (leftmost) first. Appending and taking the root cost O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `nodes[i]` covers a perfect subtree; sizes follow the set bits of `size`, high to low.
    nodes: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Append a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        // Each trailing one bit of the old size is a subtree of equal height to merge with.
        while s & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => h = node_hash(&left, &h),
                None => break,
            }
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// The tree head (MTH) of everything appended so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        match iter.next() {
            None => empty_root(),
            Some(last) => iter.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }
    fn h(s: &str) -> Hash {
        unhex(s).try_into().unwrap()
    }

    /// The Certificate Transparency reference leaves (RFC 6962 test data).
    fn reference_leaves() -> Vec<Hash> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|s| leaf_hash(&unhex(s)))
        .collect()
    }

    /// Tree heads for sizes 0..=8 over the reference leaves.
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn hashes_use_the_rfc6962_prefixes() {
        assert_eq!(hex::encode(empty_root()), ROOTS[0]);
        assert_eq!(
            empty_root(),
            <[u8; 32]>::from(Sha256::digest(b"")),
            "empty tree hash is SHA-256 of the empty string"
        );
        assert_eq!(leaf_hash(b""), <[u8; 32]>::from(Sha256::digest([0u8])));
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut cat = vec![1u8];
        cat.extend_from_slice(&a);
        cat.extend_from_slice(&b);
        assert_eq!(node_hash(&a, &b), <[u8; 32]>::from(Sha256::digest(&cat)));
        assert_ne!(node_hash(&a, &b), node_hash(&b, &a));
    }

    #[test]
    fn roots_match_the_reference_vectors_both_ways() {
        let leaves = reference_leaves();
        let mut frontier = Frontier::new();
        assert_eq!(hex::encode(frontier.root()), ROOTS[0]);
        for n in 1..=8 {
            assert_eq!(hex::encode(root(&leaves[..n])), ROOTS[n], "size {n}");
            frontier.push(leaves[n - 1]);
            assert_eq!(frontier.size(), n as u64);
            assert_eq!(hex::encode(frontier.root()), ROOTS[n], "frontier size {n}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_vectors() {
        let leaves = reference_leaves();
        let cases: [(u64, [&str; 3]); 2] = [
            (
                0,
                [
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                [
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        let root8 = h(ROOTS[8]);
        for (index, want) in cases {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(inclusion_proof(&leaves, index).unwrap(), want);
            assert!(verify_inclusion(
                &leaves[index as usize],
                index,
                8,
                &want,
                &root8
            ));
            assert!(!verify_inclusion(
                &leaves[index as usize],
                index + 1,
                8,
                &want,
                &root8
            ));
        }
        assert!(inclusion_proof(&leaves, 8).is_err());
    }

    #[test]
    fn consistency_proofs_match_the_reference_vectors() {
        let leaves = reference_leaves();
        let cases: Vec<(u64, u64, Vec<&str>)> = vec![
            (1, 1, vec![]),
            (
                1,
                8,
                vec![
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                vec![
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                vec![
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (first, second, want) in cases {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            let got = consistency_proof(&leaves[..second as usize], first).unwrap();
            assert_eq!(got, want, "consistency {first}->{second}");
            let (r1, r2) = (h(ROOTS[first as usize]), h(ROOTS[second as usize]));
            assert!(verify_consistency(first, second, &r1, &r2, &want));
            assert!(!verify_consistency(first, second, &r2, &r1, &want) || r1 == r2);
        }
        assert!(consistency_proof(&leaves[..3], 4).is_err());
    }

    #[test]
    fn every_proof_verifies_and_every_mangled_proof_fails() {
        let leaves: Vec<Hash> = (0u32..33).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = root(tree);
            for i in 0..n as u64 {
                let p = inclusion_proof(tree, i).unwrap();
                assert!(verify_inclusion(&tree[i as usize], i, n as u64, &p, &r));
                if let Some(first) = p.first() {
                    let mut bad = p.clone();
                    bad[0][0] ^= 1;
                    assert!(!verify_inclusion(&tree[i as usize], i, n as u64, &bad, &r));
                    assert!(
                        !verify_inclusion(first, i, n as u64, &p, &r) || *first == tree[i as usize]
                    );
                    assert!(!verify_inclusion(
                        &tree[i as usize],
                        i,
                        n as u64,
                        &p[1..],
                        &r
                    ));
                }
                let mut longer = p.clone();
                longer.push([0xab; 32]);
                assert!(!verify_inclusion(
                    &tree[i as usize],
                    i,
                    n as u64,
                    &longer,
                    &r
                ));
            }
            for m in 0..=n as u64 {
                let p = consistency_proof(tree, m).unwrap();
                let r1 = root(&tree[..m as usize]);
                assert!(verify_consistency(m, n as u64, &r1, &r, &p), "{m}->{n}");
                if !p.is_empty() {
                    let mut bad = p.clone();
                    let last = bad.len() - 1;
                    bad[last][5] ^= 0x80;
                    assert!(!verify_consistency(m, n as u64, &r1, &r, &bad));
                    assert!(!verify_consistency(m, n as u64, &r1, &r, &p[..last]));
                }
            }
        }
    }

    #[test]
    fn hostile_proof_parameters_do_not_panic() {
        let x = [7u8; 32];
        assert!(!verify_inclusion(&x, 0, 0, &[], &x));
        assert!(!verify_inclusion(&x, u64::MAX, u64::MAX, &[x; 70], &x));
        assert!(verify_inclusion(&x, 0, 1, &[], &x));
        assert!(!verify_inclusion(&x, 0, 1, &[x], &x));
        assert!(!verify_consistency(5, 3, &x, &x, &[x]));
        assert!(!verify_consistency(3, 5, &x, &x, &[]));
        assert!(!verify_consistency(
            u64::MAX - 1,
            u64::MAX,
            &x,
            &x,
            &[x; 130]
        ));
        assert!(!verify_consistency(0, 4, &x, &x, &[]));
        assert!(verify_consistency(0, 4, &empty_root(), &x, &[]));
    }
}

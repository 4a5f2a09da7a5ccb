//! The server's half of client-side blinding (RFC 9497 VOPRF, ristretto255-SHA512): blinded
//! elements as they arrive from clients are parsed and checked, multiplied by the OPRF key, and
//! proved with one batch DLEQ proof. Pure computation: the key and the proof's randomness come in
//! from the caller, so the fuzz target `fuzz/fuzz_targets/oprf.rs` runs exactly the server's code.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::CompressedRistretto;
use curve25519_dalek::traits::{Identity as _, VartimeMultiscalarMul as _};
use curve25519_dalek::{RistrettoPoint, Scalar};
use rand::{CryptoRng, RngCore};
use sha2::{Digest as _, Sha512};
use voprf::{Group as _, Ristretto255, VoprfServer};

/// The length of a blinded or evaluated element: a compressed ristretto255 point.
pub const ELEMENT_BYTES: usize = 32;

/// An OPRF key as the batch evaluation uses it: the private scalar and the public key.
pub struct OprfKey {
    scalar: Scalar,
    public: [u8; 32],
}

impl std::fmt::Debug for OprfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OprfKey(<secret>)")
    }
}

/// Blinded elements evaluated, with one batch proof that the key was used.
#[derive(Debug)]
pub struct Evaluated {
    /// 32 bytes each, in the order asked.
    pub elements: Vec<Vec<u8>>,
    /// The batch DLEQ proof, 64 bytes.
    pub proof: Vec<u8>,
}

/// Why a batch of blinded elements was not evaluated: a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvaluateError {
    #[error("blinded element {0} is not 32 bytes")]
    WrongLength(usize),
    #[error("blinded element {0} is not a ristretto255 point (or is the identity)")]
    NotAnElement(usize),
    #[error("the evaluation failed: try again")]
    Failed,
}

impl OprfKey {
    /// The key of a `voprf` server, or `None` if its scalar is not canonical (`voprf` never
    /// makes one).
    pub fn new(server: &VoprfServer<Ristretto255>) -> Option<Self> {
        let mut scalar = [0u8; 32];
        scalar.copy_from_slice(&server.serialize()[..32]);
        let scalar = Option::from(Scalar::from_canonical_bytes(scalar))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(&Ristretto255::serialize_elem(server.get_public_key()));
        Some(Self { scalar, public })
    }

    /// The public key (a compressed ristretto255 point), which clients pin and check every
    /// evaluation's proof against.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Evaluates blinded elements with one batch proof. Each element is checked first: 32 bytes,
    /// a valid point, not the identity; a bad one names its place and nothing is evaluated.
    /// About one scalar multiplication per element plus the proof's.
    pub fn evaluate_blinded<R: RngCore + CryptoRng>(
        &self,
        blinded: &[Vec<u8>],
        rng: &mut R,
    ) -> Result<Evaluated, EvaluateError> {
        let points = blinded
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                if bytes.len() != ELEMENT_BYTES {
                    return Err(EvaluateError::WrongLength(i));
                }
                CompressedRistretto::from_slice(bytes)
                    .ok()
                    .and_then(|c| c.decompress())
                    .filter(|p| *p != RistrettoPoint::identity())
                    .ok_or(EvaluateError::NotAnElement(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.evaluate_with_proof(blinded, &points, rng))
    }

    /// RFC 9497 `BlindEvaluate` of a batch with `GenerateProof` (section 2.2.1), as `voprf`
    /// computes it, except for the composite element: one variable-time multiscalar
    /// multiplication (its points and scalars are public) instead of one constant-time scalar
    /// multiplication per element, and each element serialised once (in one batch), which
    /// halves the server's work per number. The client checks the proof with `voprf` itself, so any difference from
    /// the RFC fails every evaluation (see the server's test of `ServerKeys::evaluate_blinded`
    /// and the fuzz target).
    fn evaluate_with_proof<R: RngCore + CryptoRng>(
        &self,
        blinded: &[Vec<u8>],
        points: &[RistrettoPoint],
        rng: &mut R,
    ) -> Evaluated {
        const CONTEXT: &[u8] = b"OPRFV1-\x01-ristretto255-SHA512";
        let hash_to_scalar = |parts: &[&[u8]]| -> Scalar {
            let dst = [b"HashToScalar-".as_slice(), CONTEXT].concat();
            // Cannot fail: the lengths are fixed and far below the limits.
            // voprf's scalar is curve25519-dalek 4's; its canonical bytes are the same scalar.
            <Ristretto255 as voprf::Group>::hash_to_scalar::<Sha512>(parts, &[&dst])
                .ok()
                .and_then(|s| Option::from(Scalar::from_canonical_bytes(s.to_bytes())))
                .unwrap_or(Scalar::ZERO)
        };
        let key = self.scalar;
        // Each evaluated element is needed only as bytes: computed as (k/2)·C and compressed
        // doubled, in one batch that shares a single field inversion among all of them.
        let half_key = key * Scalar::from(2u8).invert();
        let halves: Vec<RistrettoPoint> = points.iter().map(|c| c * half_key).collect();
        let evaluated_bytes: Vec<[u8; 32]> = RistrettoPoint::double_and_compress_batch(&halves)
            .iter()
            .map(|d| d.to_bytes())
            .collect();
        let public = self.public;
        let length = 32u16.to_be_bytes();
        let seed_dst = [b"Seed-".as_slice(), CONTEXT].concat();
        let seed_dst_length = u16::try_from(seed_dst.len()).unwrap_or(0).to_be_bytes();
        let seed = Sha512::new()
            .chain_update(length)
            .chain_update(public)
            .chain_update(seed_dst_length)
            .chain_update(&seed_dst)
            .finalize();
        let seed_length = 64u16.to_be_bytes();
        let weights: Vec<Scalar> = (0u16..)
            .zip(blinded.iter().zip(&evaluated_bytes))
            .map(|(i, (c, d))| {
                hash_to_scalar(&[
                    &seed_length,
                    &seed,
                    &i.to_be_bytes(),
                    &length,
                    c,
                    &length,
                    d,
                    b"Composite",
                ])
            })
            .collect();
        let composite = RistrettoPoint::vartime_multiscalar_mul(&weights, points);
        let z = composite * key;
        let mut wide = [0u8; 64];
        rng.fill_bytes(&mut wide);
        let r = Scalar::from_bytes_mod_order_wide(&wide);
        let t2 = RISTRETTO_BASEPOINT_TABLE * &r;
        let t3 = composite * r;
        let challenge = hash_to_scalar(&[
            &length,
            &public,
            &length,
            composite.compress().as_bytes(),
            &length,
            z.compress().as_bytes(),
            &length,
            t2.compress().as_bytes(),
            &length,
            t3.compress().as_bytes(),
            b"Challenge",
        ]);
        let response = r - challenge * key;
        Evaluated {
            elements: evaluated_bytes.iter().map(|d| d.to_vec()).collect(),
            proof: [challenge.to_bytes(), response.to_bytes()].concat(),
        }
    }
}

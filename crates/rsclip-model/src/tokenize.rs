//! Text to token ids with the model's `tokenizer.json` (SigLIP's SentencePiece tokenizer,
//! converted by tools/siglip_tokenizer.py): normalization, Unigram pieces, `</s>`, padding and
//! truncation to the manifest's `max_text_length` are all inside the tokenizer file.

use crate::manifest::{ManifestError, ModelDir};
use std::fmt;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub max_length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeError(pub String);

impl fmt::Display for TokenizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokenization failed: {}", self.0)
    }
}

impl std::error::Error for TokenizeError {}

impl TextTokenizer {
    pub fn load(model: &ModelDir) -> Result<TextTokenizer, ManifestError> {
        let path = model.dir.join("tokenizer.json");
        let bytes = model.read_verified("tokenizer.json")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ManifestError::Invalid(path.clone(), e.to_string()))?;
        let tok = TextTokenizer {
            inner,
            max_length: model.manifest.max_text_length,
        };
        // The padding/truncation inside the file must agree with the manifest.
        let probe = tok
            .encode("probe")
            .map_err(|e| ManifestError::Invalid(path.clone(), e.to_string()))?;
        if probe.len() != tok.max_length {
            return Err(ManifestError::Invalid(
                path,
                format!(
                    "encodes to {} ids, but the manifest's max_text_length is {}",
                    probe.len(),
                    tok.max_length
                ),
            ));
        }
        Ok(tok)
    }

    /// The text after the tokenizer's normalization: two texts with the same normalized form get
    /// the same token ids, hence the same embedding (what the result cache keys on).
    pub fn normalize(&self, text: &str) -> Result<String, TokenizeError> {
        use tokenizers::Normalizer;
        let Some(normalizer) = self.inner.get_normalizer() else {
            return Ok(text.to_owned());
        };
        let mut s = tokenizers::NormalizedString::from(text);
        normalizer
            .normalize(&mut s)
            .map_err(|e| TokenizeError(e.to_string()))?;
        Ok(s.get().to_owned())
    }

    /// Token ids of one text, exactly `max_length` long.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizeError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizeError(e.to_string()))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        if ids.len() != self.max_length {
            return Err(TokenizeError(format!(
                "got {} ids, expected {}",
                ids.len(),
                self.max_length
            )));
        }
        Ok(ids)
    }
}

//! The kinds of building block a recipe names and a model is built from: one enum each, shared
//! by the recipe (`configs`), the models and the Hugging Face tables, under the recipe's names.

/// A closed set of named options: an enum that (de)serializes as its names, lists them
/// (`CHOICES`, what `furnace recipe explain` prints) and displays as its name.
#[macro_export]
macro_rules! choice {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $vdoc:literal])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
        pub enum $name {
            $($(#[doc = $vdoc])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            pub const CHOICES: &'static [&'static str] = &[$($text),*];
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Normalisation over the model dimension.
    NormKind {
        /// Root mean square, with a weight (Llama, T5, Mamba).
        RmsNorm = "rmsnorm",
        /// Mean and variance, with a weight and an optional bias (GPT-2, BERT).
        LayerNorm = "layernorm",
    }
);

choice!(
    /// Position encoding; relative is T5's bucketed bias (its only one).
    PositionKind {
        /// Rotary embeddings of queries and keys (Llama).
        Rope = "rope",
        /// A per-head penalty on the scores, linear in the distance.
        Alibi = "alibi",
        /// A learned table added to the token embeddings (GPT-2, BERT).
        Learned = "learned",
        /// T5's learned bias over bucketed relative distances.
        Relative = "relative",
    }
);

choice!(
    /// Feed-forward; relu (T5) and gated-gelu (T5 v1.1, Flan-T5) are T5's, with transformers'
    /// feed_forward_proj names.
    MlpKind {
        /// down(silu(gate(x)) · up(x)) — Llama.
        SwiGlu = "swiglu",
        /// down(gelu_tanh(up(x))) — GPT-2's `gelu_new`.
        Gelu = "gelu",
        /// down(gelu(up(x))) with the exact, erf-based GELU — BERT's `gelu`.
        GeluExact = "gelu-exact",
        /// down(relu(up(x))) — T5's `relu`.
        Relu = "relu",
        /// down(gelu_tanh(gate(x)) · up(x)) — T5 v1.1's `gated-gelu`.
        GatedGelu = "gated-gelu",
    }
);

//! The `section!` macro declares one recipe section once: the struct, its serde defaults and
//! the documentation that `furnace recipe explain` prints, so the three can never drift apart.

/// One documented option of a recipe section.
#[derive(Debug, Clone)]
pub struct OptionDoc {
    pub key: &'static str,
    pub ty: &'static str,
    pub doc: &'static str,
}

/// A recipe section: its TOML table name, its documentation and its options.
pub trait Section: Default + serde::Serialize {
    const NAME: &'static str;
    const DOC: &'static str;
    fn options() -> Vec<OptionDoc>;
}

#[macro_export]
macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        $name:ident = $table:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        impl $crate::schema::Section for $name {
            const NAME: &'static str = $table;
            const DOC: &'static str = concat!($($sdoc, "\n",)*);
            fn options() -> Vec<$crate::schema::OptionDoc> {
                vec![$(
                    $crate::schema::OptionDoc {
                        key: stringify!($field),
                        ty: stringify!($ty),
                        doc: concat!($($doc, "\n",)*),
                    },
                )*]
            }
        }
    };
}

//! The `section!` macro declares one table of options once: the struct, its serde defaults,
//! a `with_<key>` builder per option and the documentation that `furnace recipe explain`
//! prints, so the four can never drift apart. The recipe's sections and each architecture's
//! model configuration are declared with it.

/// One documented option of a section.
#[derive(Debug, Clone)]
pub struct OptionDoc {
    pub key: &'static str,
    pub ty: &'static str,
    pub doc: &'static str,
}

/// A table of options: its TOML table name, its documentation and its options.
pub trait Section: Default + serde::Serialize {
    const NAME: &'static str;
    const DOC: &'static str;
    fn options() -> Vec<OptionDoc>;
}

/// A field declared `key: T = default; internal` is set by code, never by a recipe: serde
/// skips it and `options()` leaves it out.
#[macro_export]
macro_rules! section {
    (
        $(#[doc = $sdoc:literal])*
        $name:ident = $table:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr $(; $internal:ident)?
            ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                $(#[serde(skip)] #[doc = concat!("(", stringify!($internal), ": not a recipe key)")])?
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* }
            }
        }

        $crate::paste::paste! {
            impl $name {
                $(
                    pub fn [<with_ $field>](mut self, $field: $ty) -> Self {
                        self.$field = $field;
                        self
                    }
                )*
            }
        }

        impl $crate::schema::Section for $name {
            const NAME: &'static str = $table;
            const DOC: &'static str = concat!($($sdoc, "\n",)*);
            fn options() -> Vec<$crate::schema::OptionDoc> {
                let mut options = Vec::new();
                $(
                    let internal: &[&str] = &[$(stringify!($internal))?];
                    if internal.is_empty() {
                        options.push($crate::schema::OptionDoc {
                            key: stringify!($field),
                            ty: stringify!($ty),
                            doc: concat!($($doc, "\n",)*),
                        });
                    }
                )*
                options
            }
        }
    };
}

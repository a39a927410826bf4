use crate::*;

fn parse(text: &str) -> Result<Recipe, RecipeError> {
    Recipe::from_toml(text, "test.toml", &[])
}

#[test]
fn empty_recipe_takes_every_default() {
    assert_eq!(parse("").unwrap(), Recipe::default());
}

#[test]
fn unknown_key_names_line_key_and_accepted_keys() {
    let err = parse("[training]\nsteps = 5\nlearning_rate = 1e-3\n").unwrap_err();
    assert_eq!(err.line, Some(3));
    assert!(err.message.contains("learning_rate"), "{err}");
    assert!(err.message.contains("local_batch_size"), "lists accepted keys: {err}");
}

#[test]
fn wrong_type_names_line() {
    let err = parse("[training]\n\nsteps = \"many\"\n").unwrap_err();
    assert_eq!(err.line, Some(3));
    assert!(err.to_string().contains("test.toml"));
}

#[test]
fn unknown_choice_lists_accepted_values() {
    let err = parse("[model]\narch = \"gpt5\"\n").unwrap_err();
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("llama") && err.message.contains("gpt2"), "{err}");
}

#[test]
fn bad_value_is_caught_with_line_and_fix() {
    let err = parse("[model]\nflavor = \"tiny\"\nn_heads = 3\n").unwrap_err();
    assert_eq!(err.key, "model.n_heads");
    assert_eq!(err.line, Some(3));
    assert!(!err.fix.is_empty());
    let err = parse("[optimizer]\nlr = -1.0\n").unwrap_err();
    assert_eq!(err.key, "optimizer.lr");
}

#[test]
fn overrides_apply_and_are_validated() {
    let r = Recipe::from_toml("", "t.toml", &["training.lr_typo=1".into()]).unwrap_err();
    assert!(r.message.contains("lr_typo") && r.fix.contains("steps"), "{r}");
    let r = Recipe::from_toml("", "t.toml", &["optimizer.lr=1e-2".into(), "model.arch=gpt2".into()]).unwrap();
    assert_eq!(r.optimizer.lr, 1e-2);
    assert_eq!(r.model.arch(), Arch::Gpt2);
    let r = Recipe::from_toml("", "t.toml", &["training.steps=abc".into()]).unwrap_err();
    assert_eq!(r.key, "training.steps");
    let r = Recipe::from_toml("", "t.toml", &["optimizer.lr=0".into()]).unwrap_err();
    assert_eq!(r.key, "optimizer.lr");
}

#[test]
fn recipe_round_trips_through_toml() {
    let r = Recipe::from_toml("[model]\narch = \"gpt2\"\nd_model = 96\n", "t.toml", &[]).unwrap();
    assert_eq!(Recipe::from_toml(&r.to_toml(), "t.toml", &[]).unwrap(), r);
}

#[test]
fn arch_defaults_resolve() {
    let llama = ModelSection::default().model(Some(300));
    let llama = llama.as_decoder().unwrap();
    assert_eq!((llama.norm, llama.position, llama.mlp, llama.bias), (NormKind::RmsNorm, PositionKind::Rope, MlpKind::SwiGlu, false));
    assert_eq!(llama.vocab_size, 300);
    let gpt2 = ModelSection::new(Arch::Gpt2, Flavor::Gpt2_124m, Default::default(), String::new()).model(Some(300));
    let gpt2 = gpt2.as_decoder().unwrap();
    assert_eq!((gpt2.d_model, gpt2.n_layers, gpt2.vocab_size, gpt2.d_ff), (768, 12, 50257, 3072));
    assert!(gpt2.tie_embeddings && gpt2.bias);
}

#[test]
fn explain_lists_every_section_and_option() {
    let text = explain();
    for key in ["[run]", "[model]", "local_batch_size = 8", "warmup_steps", "rmsnorm | layernorm"] {
        assert!(text.contains(key), "missing {key}");
    }
}

#[test]
fn lora_section_is_validated_and_explained() {
    let recipe = parse("[lora]\nr = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\"]\n").unwrap();
    assert_eq!((recipe.lora.r, recipe.lora.quantize_base), (8, BaseQuant::None));
    let err = parse("[lora]\nr = 8\nquantize_base = \"nf4\"\n").unwrap_err();
    assert_eq!(err.key, "lora.quantize_base");
    assert!(err.fix.contains("model.init_from"), "{}", err.fix);
    assert_eq!(parse("[lora]\nr = 4\nalpha = 0.0\n").unwrap_err().key, "lora.alpha");
    assert_eq!(parse("[lora]\nr = 4\ntarget_modules = []\n").unwrap_err().key, "lora.target_modules");
    assert!(explain().contains("[lora]") && explain().contains("lora.quantize_base: none | nf4"));
}

#[test]
fn modes_take_their_data_and_dpo_is_validated() {
    let dpo = "[training]\nmode = \"dpo\"\n[data]\nsource = \"arithmetic-preferences\"\ntokenizer = \"\"\n[model]\ninit_from = \"\"\n";
    assert_eq!(parse(dpo).unwrap_err().key, "model.init_from", "DPO fine-tunes a trained model");
    let err = parse("[training]\nmode = \"sft\"\n[data]\nsource = \"stories\"\n").unwrap_err();
    assert_eq!(err.key, "training.mode");
    let base = "[model]\ninit_from = \"base\"\n[training]\nmode = \"dpo\"\n[data]\nsource = \"arithmetic-preferences\"\n";
    assert!(Recipe::from_stored(base, "r.toml").is_ok());
    assert!(Recipe::from_stored(&base.replace("mode = \"dpo\"", "mode = \"reward\""), "r.toml").is_ok());
    assert_eq!(Recipe::from_stored(&format!("{base}[dpo]\nbeta = 0.0\n"), "r.toml").unwrap_err().key, "dpo.beta");
    assert_eq!(Recipe::from_stored(&format!("{base}[dpo]\nlabel_smoothing = 0.7\n"), "r.toml").unwrap_err().key, "dpo.label_smoothing");
    assert!(explain().contains("[dpo]") && explain().contains("dpo.loss_type: sigmoid | ipo"));
    let grpo = base.replace("mode = \"dpo\"", "mode = \"grpo\"");
    assert_eq!(Recipe::from_stored(&grpo, "r.toml").unwrap_err().key, "training.mode", "GRPO's verifier needs arithmetic-chat");
    let grpo = grpo.replace("arithmetic-preferences", "arithmetic-chat");
    assert!(Recipe::from_stored(&grpo, "r.toml").is_ok());
    assert_eq!(Recipe::from_stored(&format!("{grpo}[grpo]\nnum_generations = 1\n"), "r.toml").unwrap_err().key, "grpo.num_generations");
    assert!(explain().contains("[grpo]") && explain().contains("grpo.loss_type: dapo | grpo | dr_grpo"));
    let ppo = grpo.replace("mode = \"grpo\"", "mode = \"ppo\"");
    assert!(Recipe::from_stored(&ppo, "r.toml").is_ok());
    assert_eq!(Recipe::from_stored(&format!("{ppo}[ppo]\nnum_ppo_epochs = 0\n"), "r.toml").unwrap_err().key, "ppo.num_ppo_epochs");
    assert!(explain().contains("[ppo]") && explain().contains("vf_coef = 0.1"));
    let mamba_reward = base.replace("mode = \"dpo\"", "mode = \"reward\"").replace("init_from", "arch = \"mamba\"\ninit_from");
    assert_eq!(Recipe::from_stored(&mamba_reward, "r.toml").unwrap_err().key, "training.mode", "no score head on a Mamba");
}

#[test]
fn distributed_and_mixture_of_experts_keys_are_checked() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    assert_eq!(parse("[distributed]\nstrategy = \"zero2\"\n").unwrap().distributed.strategy, Strategy::Zero2);
    assert_eq!(parse("[distributed]\nstrategy = \"zero9\"\n").unwrap_err().key, "distributed.strategy");
    assert_eq!(parse("[distributed]\nbucket_mb = 0\n").unwrap_err().key, "distributed.bucket_mb");
    let fsdp = "[distributed]\nstrategy = \"fsdp\"\n";
    assert_eq!(parse(fsdp).unwrap().distributed.strategy, Strategy::Fsdp);
    for what_fsdp_does_not_cover in
        ["[model]\ndropout = 0.1\n", "[model]\narch = \"bert\"\n", "[optimizer]\nname = \"sophia\"\n", "[lora]\nr = 4\n"]
    {
        let err = parse(&format!("{fsdp}{what_fsdp_does_not_cover}")).unwrap_err();
        assert_eq!(err.key, "distributed.strategy", "{what_fsdp_does_not_cover}");
    }
    assert!(explain().contains("[distributed]") && explain().contains("distributed.strategy: ddp | zero1 | zero2 | fsdp"));
    let mixtral = "[model]\narch = \"mixtral\"\n";
    assert_eq!(
        parse(mixtral).unwrap().model.config().as_decoder().unwrap().mlp,
        MlpKind::SwiGlu,
        "a Mixtral is a Llama in all but its MLPs"
    );
    assert_eq!(parse(&format!("{mixtral}experts_per_token = 9\n")).unwrap_err().key, "model.experts_per_token");
    assert_eq!(parse(&format!("{mixtral}mlp = \"gelu\"\n")).unwrap_err().key, "model.mlp");
    assert_eq!(parse(&format!("{mixtral}capacity_factor = -1.0\n")).unwrap_err().key, "model.capacity_factor");
}

#[test]
fn bert_resolves_to_its_fixed_layout_and_pretrains_only() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    let bert = "[model]\narch = \"bert\"\n";
    let ModelConfig::Bert(m) = parse(bert).unwrap().model.model(None) else { unreachable!("a BERT") };
    assert_eq!((m.norm_eps, m.d_ff), (1e-12, 256), "BERT's fixed layout has no keys to set: its own epsilon, a 4·d_model MLP");
    assert_eq!(parse(&format!("{bert}position = \"rope\"\n")).unwrap_err().key, "model.position");
    assert_eq!(parse(&format!("{bert}n_heads = 4\nn_kv_heads = 1\n")).unwrap_err().key, "model.n_kv_heads");
    assert_eq!(parse(&format!("{bert}[training]\nmlm_probability = 1.5\n")).unwrap_err().key, "training.mlm_probability");
    let sft = format!("{bert}init_from = \"x\"\n[data]\nsource = \"chat\"\n[training]\nmode = \"sft\"\n");
    assert_eq!(parse(&sft).unwrap_err().key, "training.mode");
    assert!(explain().contains("mlm_probability = 0.15"));
}

#[test]
fn t5_resolves_to_its_layout_and_keeps_its_keys_to_itself() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    let t5 = "[model]\narch = \"t5\"\n";
    let ModelConfig::T5(m) = parse(t5).unwrap().model.model(None) else { unreachable!("a T5") };
    assert_eq!((m.mlp, m.tie_embeddings, m.norm_eps, m.n_decoder_layers, m.head_dim), (MlpKind::Relu, true, 1e-6, 2, 16));
    assert_eq!((m.d_ff, m.relative_attention_num_buckets, m.relative_attention_max_distance), (256, 32, 128));
    let v11 = parse(&format!("{t5}mlp = \"gated-gelu\"\nn_heads = 6\nhead_dim = 12\nn_decoder_layers = 3\n")).unwrap();
    let ModelConfig::T5(m) = v11.model.model(None) else { unreachable!("a T5") };
    assert_eq!(m.d_ff, 192, "gated MLPs default to 8/3·d_model as SwiGLU");
    assert_eq!(parse(&format!("{t5}bias = true\n")).unwrap_err().key, "model.bias");
    assert_eq!(parse(&format!("{t5}mlp = \"swiglu\"\n")).unwrap_err().key, "model.mlp");
    assert_eq!(parse("[model]\narch = \"llama\"\nmlp = \"relu\"\n").unwrap_err().key, "model.mlp");
    assert_eq!(parse("[model]\nhead_dim = 8\n").unwrap_err().key, "model.head_dim");
    assert_eq!(parse("[data]\nsource = \"arithmetic-words\"\n").unwrap_err().key, "data.source");
    assert_eq!(parse(&format!("{t5}[optimizer]\nname = \"sophia\"\n")).unwrap_err().key, "optimizer.name");
    let long = format!("{t5}max_seq_len = 4096\n[data]\nsource = \"stories\"\n[training]\nseq_len = 4096\n");
    assert_eq!(parse(&long).unwrap_err().key, "training.seq_len", "more spans than sentinels");
    let pairs = parse(&format!("{t5}[data]\nsource = \"arithmetic-words\"\n")).unwrap();
    let text = parse(&format!("{t5}[data]\nsource = \"stories\"\n")).unwrap();
    assert!(pairs.trains_on_pairs() && !text.trains_on_pairs());
    let to_section = |recipe: &Recipe| ModelSection::of(&recipe.model.model(Some(500)), "x");
    let ModelConfig::T5(m) = to_section(&v11).model(None) else { unreachable!("a T5") };
    assert_eq!(m.head_dim, 12, "a stored T5 keeps its head_dim");
    assert!(!to_section(&parse("").unwrap()).gives("head_dim"), "other archs store no T5 keys");
}

#[test]
fn activation_checkpoint_modes_resolve_to_a_recompute_frequency() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    assert_eq!(parse("").unwrap().activation_checkpoint.recompute_every(), None);
    assert_eq!(parse("[activation_checkpoint]\nmode = \"full\"\n").unwrap().activation_checkpoint.recompute_every(), Some(1));
    let selective = "[activation_checkpoint]\nmode = \"selective\"\n";
    assert_eq!(parse(selective).unwrap().activation_checkpoint.recompute_every(), Some(2), "torchtitan's default");
    let every_third = format!("{selective}selective_ac_option = \"3\"\n");
    assert_eq!(parse(&every_third).unwrap().activation_checkpoint.recompute_every(), Some(3));
    for bad in ["op", "0", "-1"] {
        let err = parse(&format!("{selective}selective_ac_option = \"{bad}\"\n")).unwrap_err();
        assert_eq!(err.key, "activation_checkpoint.selective_ac_option", "{bad}");
    }
    let dropout = format!("{selective}[model]\ndropout = 0.1\n");
    assert_eq!(parse(&dropout).unwrap_err().key, "activation_checkpoint.mode");
}

#[test]
fn bf16_true_is_refused_where_it_is_not_wired() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    let bf16 = "[runtime]\nprecision = \"bf16-true\"\n";
    assert_eq!(parse(bf16).unwrap().runtime.precision, Precision::Bf16True);
    for unsupported in ["[training]\nmode = \"dpo\"\n", "[lora]\nr = 4\n"] {
        assert_eq!(parse(&format!("{bf16}{unsupported}")).unwrap_err().key, "runtime.precision", "{unsupported}");
    }
    for supported in ["[distributed]\nstrategy = \"fsdp\"\n", "[model]\narch = \"bert\"\n", "[model]\narch = \"t5\"\n"] {
        assert!(parse(&format!("{bf16}{supported}")).is_ok(), "{supported}");
    }
    assert!(explain().contains("fp32 | bf16-mixed | fp16-mixed | bf16-true"));
}

#[test]
fn batch_shards_split_preference_pairs_only() {
    let parse = |text: &str| Recipe::from_stored(text, "r.toml");
    let shards = |n: usize| format!("[runtime]\nbatch_shards = {n}\n");
    assert_eq!(parse(&shards(2)).unwrap_err().key, "runtime.batch_shards", "pretraining has no pairs");
    assert_eq!(parse(&shards(0)).unwrap_err().key, "runtime.batch_shards");
    assert!(parse(&shards(1)).is_ok());
    for mode in ["reward", "dpo"] {
        let recipe = format!("{}[training]\nmode = \"{mode}\"\n[data]\nsource = \"arithmetic-preferences\"\n", shards(2));
        let key = parse(&recipe).map_or_else(|e| e.key, |r| format!("ok {}", r.runtime.batch_shards));
        assert_ne!(key, "runtime.batch_shards", "{mode}");
    }
    let cuda = format!("{}backend = \"cuda\"\n[training]\nmode = \"reward\"\n", shards(2));
    assert_eq!(parse(&cuda).unwrap_err().key, "runtime.batch_shards");
}

#[test]
fn the_recipe_check_refuses_exactly_what_the_capability_table_lacks() {
    use crate::capabilities::{Capabilities, CAPABILITIES};
    let mode_data = |mode: TrainMode| match mode {
        TrainMode::Pretrain => "",
        TrainMode::Sft | TrainMode::Grpo | TrainMode::Ppo => "[data]\nsource = \"arithmetic-chat\"\n",
        TrainMode::Dpo | TrainMode::Reward => "[data]\nsource = \"arithmetic-preferences\"\n",
    };
    let features: [(&str, &str, &str, fn(&Capabilities) -> bool); 6] = [
        ("[lora]\nr = 4\n", "", "lora.r", |c| c.lora),
        ("[activation_checkpoint]\nmode = \"full\"\n", "", "activation_checkpoint.mode", |c| c.checkpointing),
        ("[distributed]\nstrategy = \"fsdp\"\n", "", "distributed.strategy", |c| c.fsdp),
        ("[optimizer]\nname = \"sophia\"\n", "", "optimizer.name", |c| c.sophia),
        ("[data]\nsource = \"arithmetic-chat\"\npacking = true\n", "sft", "data.packing", |c| c.packing),
        ("[training]\nteacher = \"teacher\"\n", "", "training.teacher", |c| c.distillation),
    ];
    for caps in &CAPABILITIES {
        let arch = format!("[model]\narch = \"{}\"\ninit_from = \"base\"\n", caps.arch);
        for mode in TrainMode::ALL {
            let recipe = format!("{arch}[training]\nmode = \"{mode}\"\n{}", mode_data(*mode));
            let checked = Recipe::from_stored(&recipe, "r.toml");
            match caps.modes.contains(mode) {
                true => assert!(checked.is_ok(), "{} in {mode}: {:?}", caps.arch, checked.err()),
                false => assert_eq!(checked.unwrap_err().key, "training.mode", "{} in {mode}", caps.arch),
            }
        }
        for (section, mode, key, has) in features {
            let recipe = match mode {
                "" => format!("{arch}{section}"),
                mode => format!("{arch}{section}[training]\nmode = \"{mode}\"\n"),
            };
            let checked = Recipe::from_stored(&recipe, "r.toml");
            match has(caps) {
                true => assert!(checked.is_ok(), "{} with {key}: {:?}", caps.arch, checked.err()),
                // A feature of a mode the architecture lacks is refused by the mode.
                false => assert!(
                    [key, "training.mode"].contains(&checked.as_ref().unwrap_err().key.as_str()),
                    "{} with {key}: {:?}",
                    caps.arch,
                    checked.err()
                ),
            }
        }
    }
}

/// Hostile values, each answered by an error naming the key it is about (never another key,
/// never a bare `--set`).
#[test]
fn every_bad_value_names_its_own_key() {
    let rows: &[(&str, &str)] = &[
        ("training.steps=-1", "training.steps"),
        ("training.steps=99999999999999999999999", "training.steps"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("lr_scheduler.decay=sideways", "lr_scheduler.decay"),
        ("model.arch=rnn", "model.arch"),
        ("model.flavor=huge", "model.flavor"),
        ("training.keep_last=-2", "training.keep_last"),
        ("model.sliding_window=-1", "model.sliding_window"),
        ("run.seed=-7", "run.seed"),
        ("training.seq_len=", "training.seq_len"),
        ("model.n_heads=0", "model.n_heads"),
        ("model.n_kv_heads=0", "model.n_kv_heads"),
        ("model.n_layers=0", "model.n_layers"),
        ("model.d_ff=0", "model.d_ff"),
        ("model.rope_theta=0", "model.rope_theta"),
        ("model.rope_theta=nan", "model.rope_theta"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("model.d_model=100000", "model.d_model"),
        ("model.n_layers=100000", "model.n_layers"),
        ("model.max_seq_len=1000000000", "model.max_seq_len"),
        ("model.d_ff=1000000000", "model.d_ff"),
        ("data.tokenizer_vocab_size=1000000000", "data.tokenizer_vocab_size"),
        ("runtime.threads=100000", "runtime.threads"),
        ("lora.r=100000", "lora.r"),
        ("data.num_val_examples=0", "data.num_val_examples"),
    ];
    for (item, key) in rows {
        let err = Recipe::from_toml("", "t.toml", &[item.to_string()]).expect_err(item);
        assert_eq!(&err.key, key, "--set {item}: {err}");
    }
}

#[test]
fn a_duplicated_key_in_the_file_is_named() {
    let err = parse("[training]\nsteps = 10\nsteps = 20\n").unwrap_err();
    assert_eq!(err.key, "training.steps", "{err}");
}

#[test]
fn a_recipe_stored_before_each_architecture_had_its_own_keys_still_loads() {
    // What Furnace stored then: every architecture's keys, whatever the arch.
    let old = "[model]\narch = \"mamba\"\nflavor = \"tiny\"\nd_model = 96\nrope_theta = 10000.0\nsliding_window = 0\nn_experts = 8\nd_state = 8\ndropout = 0.0\ninit_from = \"\"\n";
    let stored = Recipe::from_checkpoint(old, "r.toml").unwrap();
    let ModelConfig::Mamba(m) = stored.model.model(None) else { unreachable!("a Mamba") };
    assert_eq!((m.d_model, m.d_state), (96, 8));
    let err = Recipe::from_stored(old, "r.toml").unwrap_err();
    assert_eq!(err.key, "model.dropout", "a recipe the user writes keeps to the architecture's keys");
    assert!(err.message.contains("it is a key of llama, gpt2, mixtral, bert, t5"), "{err}");
}

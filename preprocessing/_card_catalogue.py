"""The catalogue's data: one dict of :class:`preprocessing.cards.ModelCard` fields per encoder.

Plain data, standard library only, and no import of :mod:`preprocessing.cards`
(which turns these entries into registered cards), so the facts can be read and
reviewed on their own. Where each fact comes from:

* architectures, constructor arguments, normalisation and inference precision:
  the public model cards and the loaders in TRIDENT (mahmoodlab/TRIDENT,
  ``trident/patch_encoder_models/load.py``), kaiko's ``hubconf.py``
  (kaiko-ai/towards_large_pathology_fms), HistAI/hibou, kaiko-ai/eva;
* recommended tile sizes at 20× (0.5 µm/px): TRIDENT's encoder table
  (``--patch_size``/``--mag``);
* licences and gating: the Hugging Face model cards.

A fact that could not be checked against a stored public source says so in its
card's ``notes`` ("unverified"); the loader's strict key check is the backstop
for a wrong architecture fact.

``arch_kwargs`` must stay plain data: ``mlp_layer``/``act_layer`` are spelt as
names (``"swiglu_packed"`` = timm's ``SwiGLUPacked``, ``"silu"`` = ``nn.SiLU``),
resolved by :mod:`preprocessing.foundation`.
"""

from __future__ import annotations

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # kaiko's models, Midnight
HOPTIMUS = {"mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)}
HIBOU = {"mean": (0.7068, 0.5755, 0.722), "std": (0.195, 0.2316, 0.1816)}
LUNIT = {"mean": (0.70322989, 0.53606487, 0.66096631), "std": (0.21716536, 0.26081574, 0.20723464)}

FP32 = {"cpu": "fp32", "cuda": "fp32"}
FP16 = {"cpu": "fp32", "cuda": "fp16"}
BF16 = {"cpu": "fp32", "cuda": "bf16"}

CC_NC_ND = {"licence": "CC-BY-NC-ND-4.0", "commercial": False}
APACHE = {"licence": "Apache-2.0", "commercial": True}
OWKIN_NC = {"licence": "LicenseRef-Owkin-Non-Commercial", "commercial": False}
KAIKO_NC = {"licence": "LicenseRef-Kaiko-Non-Commercial-1.0", "commercial": False}

_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_DYN = {"num_classes": 0, "dynamic_img_size": True}
_HF = "https://huggingface.co/"
_KAIKO_GH = "https://github.com/kaiko-ai/towards_large_pathology_fms"

_ENTRIES_TORCHVISION = (
    dict(name="resnet50_trunc", title="ResNet-50 to layer3 (ImageNet; CLAM's baseline)", library="torchvision",
         arch="resnet50", dim=1024, input_size=224, tile_size=224, mpp=0.5, pooling="pooled",
         repo_id="torchvision ResNet50_Weights.IMAGENET1K_V1", licence="BSD-3-Clause", commercial=True, gated=False,
         weight_files=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"), params_m=8.5,
         precision={"cpu": "fp32", "cuda": "fp32"},  # features must not depend on the hardware (as always)
         reference="https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet50.html"),
    dict(name="resnet18_trunc", title="ResNet-18 to layer3 (ImageNet; fast, for tests)", library="torchvision",
         arch="resnet18", dim=256, input_size=224, tile_size=224, mpp=0.5, pooling="pooled",
         repo_id="torchvision ResNet18_Weights.IMAGENET1K_V1", licence="BSD-3-Clause", commercial=True, gated=False,
         weight_files=("resnet18-f37072fd.pth",), params_m=2.8,
         precision={"cpu": "fp32", "cuda": "fp32"},
         reference="https://pytorch.org/vision/stable/models/generated/torchvision.models.resnet18.html"),
)

_ENTRIES_MAHMOOD = (
    dict(name="uni_v1", title="UNI (ViT-L/16, MahmoodLab)", library="timm", arch="vit_large_patch16_224",
         arch_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, **_DYN},
         dim=1024, input_size=224, tile_size=256, mpp=0.5, pooling="cls", **IMAGENET, precision=FP16,
         repo_id="MahmoodLab/UNI", **CC_NC_ND, gated=True, weight_files=("pytorch_model.bin",),
         params_m=303.4, reference=_HF + "MahmoodLab/UNI"),
    dict(name="uni_v2", title="UNI2-h (ViT-H/14, 8 registers, SwiGLU; MahmoodLab)", library="timm",
         arch="vit_giant_patch14_224",
         arch_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                      "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                      **_SWIGLU, **_DYN},
         dim=1536, input_size=224, tile_size=256, mpp=0.5, pooling="cls", **IMAGENET, precision=BF16,
         repo_id="MahmoodLab/UNI2-h", **CC_NC_ND, gated=True, weight_files=("pytorch_model.bin",),
         params_m=681.4, reference=_HF + "MahmoodLab/UNI2-h",
         notes="bf16 on GPU (the published loader's choice; fp16 is not used for this SwiGLU giant)."),
    dict(name="conch_v15", title="CONCH v1.5 vision tower (ViT-L/16 at 448 px + attention pooler; MahmoodLab)",
         library="timm", arch="vit_large_patch16_224",
         arch_kwargs={"img_size": 448, "patch_size": 16, "init_values": 1.0, "num_classes": 0},
         head="conch_attn_pool", dim=768, input_size=448, tile_size=512, mpp=0.5, pooling="pooled", **IMAGENET,
         precision=FP16, repo_id="MahmoodLab/conchv1_5", **CC_NC_ND, gated=True,
         weight_files=("pytorch_model_vision.bin",), params_m=306.7, reference=_HF + "MahmoodLab/conchv1_5",
         notes="Embedding = LayerNorm(attention pool of all ViT tokens, 1 query, 8 heads, 768-d); the "
               "file's keys start trunk./attn_pool_contrast./ln_contrast.. The tower is built at 448 px "
               "(1+28*28 position embeddings); that the released pos_embed has this shape is unverified "
               "(TRIDENT resamples it on load, so a 224-px file would need resampling)."),
)

_ENTRIES_PAIGE = (
    dict(name="virchow", title="Virchow (ViT-H/14, SwiGLU; Paige)", library="timm", arch="vit_huge_patch14_224",
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", **_SWIGLU,
                      **_DYN},
         dim=2560, input_size=224, tile_size=224, mpp=0.5, pooling="cls+mean", **IMAGENET, precision=FP16,
         repo_id="paige-ai/Virchow", **APACHE, gated=True, weight_files=("pytorch_model.bin",),
         params_m=631.2, reference=_HF + "paige-ai/Virchow",
         notes="Apache-2.0 with extra gated terms (institutional e-mail, attribution)."),
    dict(name="virchow2", title="Virchow2 (ViT-H/14, 4 registers, SwiGLU; Paige)", library="timm",
         arch="vit_huge_patch14_224",
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                      "reg_tokens": 4, **_SWIGLU, **_DYN},
         dim=2560, input_size=224, tile_size=224, mpp=0.5, pooling="cls+mean", **IMAGENET, precision=FP16,
         repo_id="paige-ai/Virchow2", **CC_NC_ND, gated=True, weight_files=("pytorch_model.bin",),
         params_m=631.2, reference=_HF + "paige-ai/Virchow2",
         notes="Trained on mixed magnifications (5x-40x); 20x is the published default."),
)

_ENTRIES_BIOPTIMUS = (
    dict(name="hoptimus0", title="H-optimus-0 (ViT-g/14, 4 registers; Bioptimus)", library="timm",
         arch="vit_giant_patch14_reg4_dinov2",
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "global_pool": "token", **_DYN},
         dim=1536, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **HOPTIMUS, precision=FP16,
         repo_id="bioptimus/H-optimus-0", **APACHE, gated=True, weight_files=("pytorch_model.bin",),
         params_m=1134.8, reference=_HF + "bioptimus/H-optimus-0",
         notes="Gated with automatic approval."),
    dict(name="hoptimus1", title="H-optimus-1 (ViT-g/14, 4 registers; Bioptimus)", library="timm",
         arch="vit_giant_patch14_reg4_dinov2",
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "global_pool": "token", **_DYN},
         dim=1536, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **HOPTIMUS, precision=FP16,
         repo_id="bioptimus/H-optimus-1", licence="LicenseRef-Bioptimus-H-optimus-1", commercial=False,
         gated=True, weight_files=("pytorch_model.bin",), params_m=1134.8,
         reference=_HF + "bioptimus/H-optimus-1",
         notes="Licence text unverified: access is reviewed per request and Bioptimus sells commercial "
               "licences separately, so treat it as non-commercial."),
    dict(name="h0-mini", title="H0-mini (ViT-B/14, 4 registers, SwiGLU; distilled from H-optimus; Bioptimus)",
         library="timm", arch="vit_base_patch14_reg4_dinov2",
         arch_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **_SWIGLU, **_DYN},
         dim=768, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **HOPTIMUS, precision=FP16,
         repo_id="bioptimus/H0-mini", licence="CC-BY-NC-ND-4.0", commercial=False, gated=True,
         weight_files=("pytorch_model.bin",), params_m=85.7, reference=_HF + "bioptimus/H0-mini",
         notes="The model card also offers CLS + mean of patch tokens (1536-d); this card gives the CLS "
               "token (TRIDENT's default). Unverified: mlp_ratio (set for DINOv2's fused SwiGLU, "
               "hidden 2048) and the licence id."),
)

_ENTRIES_OTHER_TIMM = (
    dict(name="gigapath", title="Prov-GigaPath tile encoder (ViT-g/16, SwiGLU; Microsoft/Providence)",
         library="timm", arch="vit_giant_patch14_dinov2",
         arch_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                      "num_heads": 24, "mlp_ratio": 5.33334, "init_values": 1e-5, **_SWIGLU, **_DYN},
         dim=1536, input_size=224, tile_size=256, mpp=0.5, pooling="cls", **IMAGENET, precision=FP16,
         repo_id="prov-gigapath/prov-gigapath", **APACHE, gated=True, weight_files=("pytorch_model.bin",),
         params_m=1135.0, reference=_HF + "prov-gigapath/prov-gigapath",
         notes="Published transform: resize 256 (bicubic), centre-crop 224. init_values and the SwiGLU MLP "
               "come from timm's vit_giant_patch14_dinov2 definition (spelt out here). The gated terms ask "
               "for research use: check them before commercial use."),
    dict(name="lunit-vits8", title="Lunit DINO ViT-S/8", library="timm", arch="vit_small_patch8_224",
         arch_kwargs={"img_size": 224, **_DYN}, dim=384, input_size=224, tile_size=224, mpp=0.5,
         pooling="cls", **LUNIT, precision=FP32, repo_id="1aurent/vit_small_patch8_224.lunit_dino",
         licence="LicenseRef-Lunit-Non-Commercial", commercial=False, gated=False,
         weight_files=("model.safetensors", "dino_vit_small_patch8_ep200.torch"), params_m=21.7,
         reference="https://github.com/lunit-io/benchmark-ssl-pathology",
         notes="model.safetensors is the timm conversion on the hub; the original .torch release's key "
               "layout is unverified."),
)


def _kaiko(size: str, patch: int, arch: str, dim: int, params: float, img_size: int = 224) -> dict:
    return dict(
        name=f"kaiko-vit{size}{patch}", title=f"kaiko.ai ViT-{size.upper()}/{patch} (DINO/DINOv2, TCGA)",
        library="timm", arch=arch, arch_kwargs={"img_size": img_size, **_DYN}, dim=dim, input_size=224,
        tile_size=256, mpp=0.5, pooling="cls", **HALF, precision=FP32, repo_id="kaiko-ai/towards_large_pathology_fms",
        **KAIKO_NC, gated=False, weight_files=(f"vit{size}{patch}.pth", "model.safetensors"), params_m=params,
        reference=_KAIKO_GH,
        notes="Weights: GitHub release 0.0.1 (vit*.pth) or the timm mirror 1aurent/<arch>.kaiko_ai_towards_"
              "large_pathology_fms (model.safetensors). Unverified: the .pth key layout (assumed plain timm)."
              + (" Built at 518 px (37x37 position embeddings), interpolated to 224 at run time."
                 if img_size != 224 else ""),
    )


_ENTRIES_KAIKO = (
    _kaiko("s", 16, "vit_small_patch16_224", 384, 21.7),
    _kaiko("s", 8, "vit_small_patch8_224", 384, 21.7),
    _kaiko("b", 16, "vit_base_patch16_224", 768, 85.8),
    _kaiko("b", 8, "vit_base_patch8_224", 768, 85.8),
    _kaiko("l", 14, "vit_large_patch14_reg4_dinov2", 1024, 304.4, img_size=518),
    dict(name="midnight12k", title="Midnight-12k (ViT-g/14, DINOv2, TCGA; kaiko.ai)", library="transformers",
         arch="Dinov2Model",
         arch_kwargs={"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "patch_size": 14,
                      "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": True, "layerscale_value": 1e-5,
                      "layer_norm_eps": 1e-6},
         dim=3072, input_size=224, tile_size=224, mpp=0.5, pooling="cls+mean", **HALF, precision=FP16,
         repo_id="kaiko-ai/midnight", licence="MIT", commercial=True, gated=False,
         weight_files=("model.safetensors",), params_m=1134.8, reference=_HF + "kaiko-ai/midnight",
         notes="Unverified: config.json values (taken as DINOv2 ViT-g/14 at 224 px)."),
)

_ENTRIES_HF = (
    dict(name="phikon", title="Phikon (iBOT ViT-B/16; Owkin)", library="transformers", arch="ViTModel",
         arch_kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True,
                      "layer_norm_eps": 1e-6},
         dim=768, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **IMAGENET, precision=FP32,
         repo_id="owkin/phikon", **OWKIN_NC, gated=False, weight_files=("pytorch_model.bin", "model.safetensors"),
         params_m=85.8, reference=_HF + "owkin/phikon",
         notes="Built without the pooler (TRIDENT: add_pooling_layer=False); a release file carrying "
               "pooler.* keys is unverified. layer_norm_eps 1e-6 follows the hub's 'match timm' fix."),
    dict(name="phikon_v2", title="Phikon-v2 (DINOv2 ViT-L/16; Owkin)", library="transformers", arch="Dinov2Model",
         arch_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16,
                      "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": False, "layerscale_value": 1e-5,
                      "layer_norm_eps": 1e-6},
         dim=1024, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **IMAGENET, precision=FP32,
         repo_id="owkin/phikon-v2", **OWKIN_NC, gated=False, weight_files=("model.safetensors",),
         params_m=303.4, reference=_HF + "owkin/phikon-v2",
         notes="Unverified: config.json values beyond ViT-L/16 (image_size 224 assumed)."),
    dict(name="hibou_b", title="Hibou-B (DINOv2 ViT-B/14, 4 registers, SwiGLU; HistAI)", library="transformers",
         arch="Dinov2WithRegistersModel",
         arch_kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14,
                      "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": True, "num_register_tokens": 4,
                      "layerscale_value": 1e-5, "layer_norm_eps": 1e-6},
         dim=768, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **HIBOU, precision=FP32,
         repo_id="histai/hibou-b", **APACHE, gated=False, weight_files=("model.safetensors",),
         params_m=85.7, reference=_HF + "histai/hibou-b",
         notes="The release uses custom remote code (DINOv2 + registers); we build transformers' own "
               "Dinov2WithRegistersModel and never run remote code. Unverified: that the release's key "
               "names match it."),
    dict(name="hibou_l", title="Hibou-L (DINOv2 ViT-L/14, 4 registers, SwiGLU; HistAI)", library="transformers",
         arch="Dinov2WithRegistersModel",
         arch_kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
                      "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": True, "num_register_tokens": 4,
                      "layerscale_value": 1e-5, "layer_norm_eps": 1e-6},
         dim=1024, input_size=224, tile_size=224, mpp=0.5, pooling="cls", **HIBOU, precision=FP32,
         repo_id="histai/hibou-L", **APACHE, gated=False, weight_files=("model.safetensors",),
         params_m=303.7, reference=_HF + "histai/hibou-L",
         notes="As hibou_b. Unverified: SwiGLU for the L model (HistAI's builder default) and gating."),
)

ENTRIES: tuple[dict, ...] = (
    _ENTRIES_TORCHVISION + _ENTRIES_MAHMOOD + _ENTRIES_PAIGE + _ENTRIES_BIOPTIMUS + _ENTRIES_OTHER_TIMM
    + _ENTRIES_KAIKO + _ENTRIES_HF
)

# FCN, ResNet-50 D8 (dilated, output stride 8), PASCAL VOC 2012 + SBD aug, 512x512 crops, 20k
# iterations, batch 4 x 4 GPUs: mmselfsup's segmentation benchmark, written out in full (no mmseg::
# base, no download). `cgh transfer seg` fills in: data_root, the backbone's depth and init
# checkpoint (the converted backbone), BN instead of SyncBN on CPU, work_dir and the seed, and the
# per-process batch (train_dataloader.batch_size: global_batch / gpus, or this file's 4 per GPU
# with gradient accumulation; `global_batch` and `batch_mode` in configs/transfer/seg_*.yaml).
#
# Backbone flavour: mmselfsup 0.x's benchmark model (configs/benchmarks/mmsegmentation/_base_/
# models/fcn_r50-d8.py): mmseg `ResNet`, the torchvision 7x7 stem and names, so a torchvision-
# layout checkpoint (every method this toolkit reads) fills it completely. mmselfsup 1.x and
# mmpretrain take mmseg's own config instead (`mmseg::fcn/fcn_r50-d8_4xb4-20k_voc12aug-512x512.py`):
# `ResNetV1c`, whose deep stem (three 3x3 convs, `stem.*`) has no torchvision counterpart and would
# stay random; its `pretrained='open-mmlab://resnet50_v1c'` plus their launch script's init_cfg also
# trips mmseg 1.2.2's "init_cfg and pretrained cannot be setting at the same time" assertion.
# tests/test_seg_protocol.py shows both.
norm_cfg = dict(type='SyncBN', requires_grad=True)
crop_size = (512, 512)
data_root = 'data/VOCdevkit/VOC2012'
num_classes = 21

model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        # Crops smaller than crop_size are padded here, after normalisation, with 0 (the mean
        # colour) and label 255 (ignored): mmseg 0.x's Normalize -> Pad(pad_val=0, seg_pad_val=255),
        # the pipeline of mmselfsup 0.x's benchmark. (mmseg 1.x's VOC aug config puts a raw
        # Pad(size=crop_size) in the pipeline instead, i.e. black before normalisation; its
        # Cityscapes config pads here, as this file does.)
        pad_val=0,
        seg_pad_val=255,
        size=crop_size),
    pretrained=None,
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True,
        init_cfg=None),
    decode_head=dict(
        type='FCNHead',
        in_channels=2048,
        in_index=3,
        channels=512,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# ---- data: train on VOC2012 train (SegmentationClass) + SBD aug (SegmentationClassAug, aug.txt)
dataset_type = 'PascalVOCDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,        # per GPU on the protocol's 4 GPUs; `cgh transfer seg` sets it (see above)
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ConcatDataset', datasets=[
        dict(type=dataset_type, data_root=data_root,
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
             ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline),
        dict(type=dataset_type, data_root=data_root,
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
             ann_file='ImageSets/Segmentation/aug.txt', pipeline=train_pipeline),
    ]))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
                 ann_file='ImageSets/Segmentation/val.txt', pipeline=test_pipeline))
test_dataloader = val_dataloader
# IoUMetric that also returns per-class IoU (registered by transfer/seg.py)
val_evaluator = dict(type='CghIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ---- schedule: SGD lr 0.01, poly decay, 20k iterations (of global batch 16). mmengine's PolyLR
# (mmseg/mmselfsup 1.x) reaches eta_min at iteration end-1, mmcv 1.x's poly hook (mmseg 0.x)
# would at max_iters: a 1/20000 stretch of the decay, too small to offer both.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=20000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=20000, val_interval=2000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# ---- runtime
default_scope = 'mmseg'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

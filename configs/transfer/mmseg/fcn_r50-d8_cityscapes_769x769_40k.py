# FCN, ResNet-50 D8, Cityscapes (fine), 769x769 crops, 40k iterations, batch 2 x 4 GPUs,
# sliding-window test (mmselfsup's segmentation benchmark). Same model (mmseg `ResNet`, 7x7 stem:
# see the VOC config for why not ResNetV1c), padding (after normalisation, 0 / label 255) and
# schedule as the VOC config except the data, align_corners=True and the 40k poly schedule.
# `cgh transfer seg` sets train_dataloader.batch_size from global_batch (8) and --gpus.
_base_ = './fcn_r50-d8_voc12aug_512x512_20k.py'

crop_size = (769, 769)
data_root = 'data/cityscapes/'
num_classes = 19
dataset_type = 'CityscapesDataset'

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=num_classes, align_corners=True),
    auxiliary_head=dict(num_classes=num_classes, align_corners=True),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(513, 513)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2049, 1025), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2049, 1025), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,        # per GPU on the protocol's 4 GPUs
    num_workers=2,
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(_delete_=True, type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader

param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))

# Small CPU setting on the synthshapes VOC2012 (+ aug) masks, for tests and the demo: 128 px crops,
# batch 4 (global_batch in configs/transfer/seg_synth.yaml), few iterations, light heads. The model
# and schedule shape follow the VOC config; the backbone depth comes from the checkpoint
# (`cgh transfer seg` with depth=auto).
_base_ = './fcn_r50-d8_voc12aug_512x512_20k.py'

crop_size = (128, 128)
data_root = 'synth/VOCdevkit/VOC2012'
# background + the synthshapes detection shapes, in label order (synthshapes.json: segmentation)
classes = ('background', 'circle', 'square', 'triangle', 'star', 'cross')
dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes)

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(channels=64, num_classes=len(classes), dropout_ratio=0.0),
    auxiliary_head=dict(channels=32, num_classes=len(classes), dropout_ratio=0.0))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
synth_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(_delete_=True, type='ConcatDataset', datasets=[
        dict(synth_dataset, data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
             ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline),
        dict(synth_dataset, data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
             ann_file='ImageSets/Segmentation/aug.txt', pipeline=train_pipeline),
    ]))
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(_delete_=True, **synth_dataset,
                 data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
                 ann_file='ImageSets/Segmentation/val.txt', pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.02))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=300, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=100000)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100000))
env_cfg = dict(cudnn_benchmark=False)
# No validation pass during training: the protocol tests once at the end.
val_dataloader = None
val_evaluator = None
val_cfg = None

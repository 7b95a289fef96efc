# The VOC12aug protocol with mmseg 1.x's padding (mmseg's configs/_base_/datasets/pascal_voc12_aug.py,
# which mmselfsup 1.x and mmpretrain use): crops smaller than 512x512 are padded in the pipeline,
# before normalisation, with black pixels (mmcv's Pad: image 0, label 255), so the network sees
# (0 - mean) / std there instead of 0. Everything else is the default config
# (fcn_r50-d8_voc12aug_512x512_20k.py: mmselfsup 0.x's benchmark, padding after normalisation).
_base_ = './fcn_r50-d8_voc12aug_512x512_20k.py'

crop_size = (512, 512)
data_root = 'data/VOCdevkit/VOC2012'
dataset_type = 'PascalVOCDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='Pad', size=crop_size),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    dataset=dict(type='ConcatDataset', datasets=[
        dict(type=dataset_type, data_root=data_root,
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
             ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline),
        dict(type=dataset_type, data_root=data_root,
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
             ann_file='ImageSets/Segmentation/aug.txt', pipeline=train_pipeline),
    ]))

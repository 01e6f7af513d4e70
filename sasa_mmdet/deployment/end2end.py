"""A detector's network with its box decoding and NMS, for export.

:class:`End2EndDetector` runs the detector in ``mode='tensor'`` and then
what MMDetection's ``predict`` does for a RetinaNet-style head (sigmoid
classification, anchors, a box coder), in traceable tensor operations, so
the exported graph returns detections: ``dets (B, N, 5)`` (x1, y1, x2, y2,
score) and ``labels (B, N)``, mmdeploy's layout, N = ``max_per_img``.

The steps are the head's test config (``nms_pre``, ``score_thr``,
``min_bbox_size``, ``nms.iou_threshold``, ``max_per_img``) applied as
``BaseDenseHead._predict_by_feat_single`` does, with mmdet's own prior
generator and box coder:

1. per level, the ``nms_pre`` best (anchor, class) scores (TopK);
2. their anchors' boxes decoded and clipped to the input size;
3. boxes no wider or taller than ``min_bbox_size`` dropped;
4. class-aware NMS: ONNX ``NonMaxSuppression`` (scores above
   ``score_thr``, IoU above ``iou_threshold`` suppressed) on boxes offset by
   class, as mmcv's ``batched_nms`` does;
5. the ``max_per_img`` best survivors per image, best first.

Rows past an image's detections are padding: score 0, label -1, box 0.
Boxes are in the coordinates of the network's input (the resized, padded
batch): divide by the resize's scale factor for the original image
(``tools/deployment/onnx_inference.py`` does). There is no pre-processing in
the graph: the input is the normalised batch, as ``DetDataPreprocessor``
gives.
"""
import inspect
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

#: Output names of the end-to-end graph.
END2END_OUTPUTS = ['dets', 'labels']
#: NonMaxSuppression's max_output_boxes_per_class: no limit (as mmdet).
MAX_NMS_OUTPUT = 1 << 30


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (opset 10+), one class: returns the kept
    ``(K, 3)`` ``[batch, 0, box]`` indices, each image's best first. Its
    forward computes the same with torchvision's NMS (what tracing runs)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_output: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        from torchvision.ops import nms
        selected = []
        for image, (image_boxes, image_scores) in enumerate(zip(boxes, scores[:, 0])):
            candidates = torch.nonzero(image_scores > score_threshold).flatten()
            keep = nms(image_boxes[candidates], image_scores[candidates], iou_threshold)
            keep = candidates[keep[:max_output]]
            selected.append(torch.stack([torch.full_like(keep, image), torch.zeros_like(keep),
                                         keep], dim=1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 3), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_output, iou_threshold, score_threshold):
        return g.op('NonMaxSuppression', boxes, scores,
                    g.op('Constant', value_t=torch.tensor([max_output], dtype=torch.long)),
                    g.op('Constant', value_t=torch.tensor([iou_threshold], dtype=torch.float)),
                    g.op('Constant',
                         value_t=torch.tensor([score_threshold], dtype=torch.float)))


def _topk_count(k: int, size: Tensor):
    """``min(k, size)``: an int in eager mode, a traced value under tracing
    (so that a dynamic input size gives a dynamic TopK)."""
    if torch.jit.is_tracing():
        return torch.minimum(torch.tensor(k), size)
    return min(k, int(size))


class End2EndDetector(nn.Module):
    """A detector's ``mode='tensor'`` network followed by box decoding and NMS.

    Args:
        detector (nn.Module): An MMDetection single-stage detector whose
            ``bbox_head`` is a sigmoid-classification anchor head
            (``RetinaHead``, ``SASARetinaHead``).
        test_cfg (dict, optional): Overrides of the head's ``test_cfg``
            (``nms_pre``, ``score_thr``, ``min_bbox_size``, ``nms``,
            ``max_per_img``).

    Example:
        >>> net = End2EndDetector(detector)  # a RetinaNet in eval mode
        >>> dets, labels = net(torch.rand(1, 3, 64, 64))
        >>> dets.shape, labels.shape  # max_per_img = 100
        (torch.Size([1, 100, 5]), torch.Size([1, 100]))
    """

    output_names = END2END_OUTPUTS

    def __init__(self, detector: nn.Module, test_cfg: Optional[dict] = None) -> None:
        super().__init__()
        head = getattr(detector, 'bbox_head', None)
        from mmdet.models.dense_heads import AnchorHead
        from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
        if not isinstance(head, AnchorHead) or not head.use_sigmoid_cls:
            raise TypeError('End2EndDetector needs a single-stage detector with a sigmoid-'
                            'classification anchor head (RetinaHead, SASARetinaHead), got '
                            f'{type(head).__name__}')
        if type(head.bbox_coder) is not DeltaXYWHBBoxCoder:
            raise TypeError('End2EndDetector decodes with DeltaXYWHBBoxCoder, the head has '
                            f'{type(head.bbox_coder).__name__}')
        cfg = dict(head.test_cfg or {})
        cfg.update(test_cfg or {})
        nms = cfg.get('nms') or {}
        if nms.get('type', 'nms') != 'nms':
            raise ValueError(f"End2EndDetector exports test_cfg.nms type 'nms' only, got "
                             f"{nms.get('type')!r}")
        self.detector = detector
        self.nms_pre = int(cfg.get('nms_pre', -1))
        self.score_thr = float(cfg.get('score_thr', 0.0))
        self.min_bbox_size = float(cfg.get('min_bbox_size', -1))
        self.iou_threshold = float(nms.get('iou_threshold', 0.5))
        self.max_per_img = int(cfg.get('max_per_img', 100))

    def forward(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        head = self.detector.bbox_head
        cls_scores, bbox_preds = self.detector(inputs, None, mode='tensor')
        batch = inputs.shape[0]
        height, width = inputs.shape[2], inputs.shape[3]
        priors = head.prior_generator.grid_priors(
            [score.shape[-2:] for score in cls_scores], dtype=inputs.dtype,
            device=inputs.device)
        boxes, scores, labels = [], [], []
        for cls_score, bbox_pred, level_priors in zip(cls_scores, bbox_preds, priors):
            classes = head.cls_out_channels
            level_scores = cls_score.permute(0, 2, 3, 1).reshape(batch, -1).sigmoid()
            deltas = bbox_pred.permute(0, 2, 3, 1).reshape(batch, -1, 4)
            count = torch._shape_as_tensor(level_scores)[1] if torch.jit.is_tracing() \
                else level_scores.shape[1]
            k = count if self.nms_pre <= 0 else _topk_count(self.nms_pre, count)
            top_scores, index = level_scores.topk(k, dim=1)  # (B, k), best first
            anchor = index // classes
            deltas = deltas.gather(1, anchor.unsqueeze(-1).expand(-1, -1, 4))
            boxes.append(self.decode(level_priors[anchor], deltas, inputs))
            scores.append(top_scores)
            labels.append(index % classes)
        return self.postprocess(torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1))

    def decode(self, priors: Tensor, deltas: Tensor, inputs: Tensor) -> Tensor:
        """Boxes ``(B, k, 4)`` from anchors and deltas ``(B, k, 4)`` with
        mmdet's ``delta2bbox`` (what ``predict`` runs; the coder's own batched
        ONNX path imports a module mmdet 3 no longer has), clipped to the
        input's size (a traced size under ``--dynamic``)."""
        from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox
        coder = self.detector.bbox_head.bbox_coder
        # predict leaves decode's wh_ratio_clip at its default
        ratio_clip = inspect.signature(coder.decode).parameters['wh_ratio_clip'].default
        boxes = delta2bbox(priors.reshape(-1, 4), deltas.reshape(-1, 4), coder.means,
                           coder.stds, None, ratio_clip, False, coder.add_ctr_clamp,
                           coder.ctr_clamp).reshape(priors.shape)
        if not coder.clip_border:
            return boxes
        if torch.jit.is_tracing():
            size = torch._shape_as_tensor(inputs)[2:].to(boxes.dtype)  # (H, W)
        else:
            size = boxes.new_tensor(inputs.shape[2:])
        limit = size.flip(0).repeat(2)  # (W, H, W, H)
        return torch.minimum(boxes.clamp(min=0), limit)

    def postprocess(self, boxes: Tensor, scores: Tensor,
                    labels: Tensor) -> Tuple[Tensor, Tensor]:
        """Steps 3-5 of the module docstring on candidates ``(B, M, 4)``,
        ``(B, M)``, ``(B, M)``."""
        batch, candidates = scores.shape[0], scores.shape[1]
        if self.min_bbox_size >= 0:
            wide = (boxes[..., 2] - boxes[..., 0]) > self.min_bbox_size
            tall = (boxes[..., 3] - boxes[..., 1]) > self.min_bbox_size
            scores = torch.where(wide & tall, scores, torch.zeros_like(scores))
        # class-aware NMS as one class: boxes of different classes moved apart
        largest = boxes.flatten(1).max(dim=1).values  # (B,)
        offsets = labels.to(boxes.dtype) * (largest[:, None] + 1)
        selected = _NonMaxSuppression.apply(boxes + offsets.unsqueeze(-1), scores.unsqueeze(1),
                                            MAX_NMS_OUTPUT, self.iou_threshold, self.score_thr)
        image, kept = selected[:, 0], selected[:, 2]
        flat = image * candidates + kept  # into the (B * M) candidates
        kept_scores = scores.reshape(-1)[flat]  # (K,)
        # Each image's best max_per_img: a (B, K + P) table of the kept
        # scores (-1 where the detection is another image's, and P columns
        # of padding), then TopK per row.
        padding = self.max_per_img
        mine = image.unsqueeze(0) == torch.arange(batch, device=scores.device).unsqueeze(1)
        table = torch.where(mine, kept_scores.unsqueeze(0), torch.full_like(mine, -1,
                                                                            dtype=scores.dtype))
        table = torch.cat([table, scores.new_full((batch, padding), -1.0)], dim=1)
        top, position = table.topk(padding, dim=1)  # (B, P)
        flat = torch.cat([flat, flat.new_zeros(padding)])[position]
        valid = top >= 0
        det_boxes = boxes.reshape(-1, 4)[flat] * valid.unsqueeze(-1).to(boxes.dtype)
        det_scores = torch.where(valid, top, torch.zeros_like(top))
        det_labels = torch.where(valid, labels.reshape(-1)[flat], torch.full_like(flat, -1))
        return torch.cat([det_boxes, det_scores.unsqueeze(-1)], dim=-1), det_labels


def detections_from_outputs(dets, labels, score_thr: float = 0.0) -> List[dict]:
    """Per image, the non-padding rows of an end-to-end graph's outputs:
    ``[{'bboxes': (n, 4), 'scores': (n,), 'labels': (n,)}]`` (numpy or
    torch, as given), score above ``score_thr`` and label >= 0."""
    results = []
    for image_dets, image_labels in zip(dets, labels):
        keep = (image_labels >= 0) & (image_dets[:, 4] > score_thr)
        results.append(dict(bboxes=image_dets[keep, :4], scores=image_dets[keep, 4],
                            labels=image_labels[keep]))
    return results

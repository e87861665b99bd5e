"""Images: class guidance, Frechet distances (FD/FID), classifier features and image sampling to files."""

from rectflow.images.guidance import NULL_LABEL, drop_labels, num_classes_of, require_conditional, LabelledCoupling, ConditionalFlowBatch, ConditionalFlowMatchingObjective, GuidedVelocity, sample_guided
from rectflow.images.metrics import INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, inception_network, load_feature_network, extract_features, feature_statistics, frechet_distance, fd, fid, precision_recall, save_statistics, load_statistics
from rectflow.images.classifier_features import ClassifierFeatures, ClassifierReport, train_classifier_features
from rectflow.images.sampling import FixedStepSampler, image_grid, save_image_grid, save_pair_grid, sample_images, SampleGridCallback

__all__ = [
    "NULL_LABEL",
    "drop_labels",
    "num_classes_of",
    "require_conditional",
    "LabelledCoupling",
    "ConditionalFlowBatch",
    "ConditionalFlowMatchingObjective",
    "GuidedVelocity",
    "sample_guided",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "InceptionFeatures",
    "inception_network",
    "load_feature_network",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "fd",
    "fid",
    "precision_recall",
    "save_statistics",
    "load_statistics",
    "ClassifierFeatures",
    "ClassifierReport",
    "train_classifier_features",
    "FixedStepSampler",
    "image_grid",
    "save_image_grid",
    "save_pair_grid",
    "sample_images",
    "SampleGridCallback",
]

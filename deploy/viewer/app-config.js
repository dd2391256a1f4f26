/** OHIF v3 configuration for mrrp-pacs: served as /app-config.js by mrrp_pacs.viewer.
 *
 * DICOMweb comes from the same origin (/dicom-web), which the viewer server forwards to
 * Orthanc's DICOMweb plugin, so no CORS is needed and Orthanc's bulk-data URIs point back
 * here. Tours and the investigational-use dialog are off: they cover the image on first use
 * and stop automated runs. Nothing is uploaded or deleted through this viewer.
 */
window.config = {
  name: 'mrrp-pacs',
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  investigationalUseDialog: { option: 'never' },
  customizationService: [{ 'ohif.tours': { $set: [] } }],
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (mrrp-pacs)',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        // Orthanc's DICOMweb 1.7 ignores a comma-separated includefield
        qidoSupportsIncludeField: false,
        supportsReject: false,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
